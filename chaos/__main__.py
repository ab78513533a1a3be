"""`python -m chaos [--profile short|full] [--results FILE]` (`make chaos`): runs every fault of the
profile under a steady CreateOrder load and prints one table; needs `make infra-up`."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from chaos.suite import PROFILES, FaultOutcome, run_suite, table


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.machine()}"


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_suite, which stops the stack it started


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description="fault suite")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--orders", type=int, help="orders per fault (default: the profile's)")
    parser.add_argument("--fault", action="append", help="run only this fault (repeatable)")
    parser.add_argument("--results", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    fault_names, orders = PROFILES[args.profile]
    fault_names = args.fault or fault_names
    orders = args.orders or orders

    def progress(outcome: FaultOutcome) -> None:
        print(
            f"done: {outcome.fault}: {outcome.acknowledged} acknowledged, "
            f"{outcome.lost} lost, {outcome.duplicate_effects} duplicate effects,"
            f" {outcome.reordered} reordered",
            flush=True,
        )

    started = datetime.now(UTC)
    outcomes = run_suite(fault_names, orders, progress)
    report = table(outcomes)
    print(report)
    if args.results:
        args.results.write_text(
            f"# Fault suite results\n\n`python -m chaos --profile {args.profile}"
            f"{f' --orders {args.orders}' if args.orders else ''}` on {started:%Y-%m-%d %H:%M} UTC,"
            f" {machine()}; {orders} orders per fault, each fault injected once while the load"
            " runs, then the system settles. Security on, as deployed: every gRPC call over"
            " mutual TLS with a bearer token (the processor with its own certificate), Kafka over"
            " mutual TLS with per-principal ACLs, each service logged into PostgreSQL as its"
            " own role with a password. Two replicas of user_service, of order_service (one relay"
            " leads, elected by a PostgreSQL advisory lock) and of the processor (one consumer"
            " group); the load goes round-robin over the order_service replicas, and a fault"
            " naming a service hits one replica, the relay leader where it has one. The partitions"
            " run order_service-2 in a network namespace of the run's own (chaos/netns.py) and"
            " drop its packets to PostgreSQL or Kafka with iptables rules inside it.\n\n"
            "After settling, the checker reads both topics (orders and users) from the start and"
            " the database, for every acknowledged order and every user the suite created"
            " (events told apart by ce_id; redeliveries of one event id are allowed):\n\n"
            "- lost: an order acknowledged by CreateOrder but not in a terminal status, or without"
            " an OrderCreated or an OrderStatusChanged on the topic; a user without UserCreated\n"
            "- duplicate effects: more than one distinct OrderCreated or OrderStatusChanged, or"
            " more than one recorded status transition, for one order; more than one distinct"
            " UserCreated for one user\n"
            "- reordered: an order whose first OrderStatusChanged comes before its first"
            " OrderCreated (or in another partition), or whose status history in the database"
            " goes back or skips (each change starts from where the previous one left it)\n"
            "- failed attempts: CreateOrder attempts that failed, by code (the load retries"
            " transient codes with the same request_id)\n"
            "- seconds to recover: from the fault until an order placed after it is terminal;"
            " that order waits behind the backlog the load built meanwhile, so this is an"
            " upper bound\n\n"
            f"{report}\n"
        )
    if any(o.failed for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
