"""Pure logic of the bench: /proc parsing, CPU between samples, which statements count as what,
the sweep's bracketing and bisection, backlog flatness, RetryInfo in a refusal's trailer, the
per-order figures and the results file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import cast

import grpc
import pytest
from ecommerce.v1 import orders_pb2
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from bench.costs import WindowCosts
from bench.counters import StatementCalls, is_request_path_write, mentions_notify, write_targets
from bench.e2e_latency import SentOrders, carries_retry_info
from bench.figures import structural
from bench.pipeline import Window, best_held, growth_per_second, is_flat, next_share
from bench.proc import (
    CLOCK_TICKS_PER_SECOND,
    CpuSpent,
    ProcStat,
    cpu_spent,
    parse_proc_stat,
    sample_tree,
)
from bench.run import write_results
from order_service.service import INSERT_ANNOUNCED_ORDER
from order_service.status_changes import WRITE_CHANGES
from servicekit.outbox import DELETE_PUBLISHED, SELECT_PENDING


def test_proc_stat_fields_after_a_command_name_with_spaces_and_parentheses() -> None:
    line = "4242 (postgres: a (b) c) S 77 4242 4242 0 -1 4194560 1 0 0 0 150 25 9 3 20 0 1 0 9"
    assert parse_proc_stat(line) == ProcStat(pid=4242, ppid=77, cpu_ticks=175, reaped_ticks=12)


def stats(*rows: tuple[int, int, int, int]) -> dict[int, ProcStat]:
    return {pid: ProcStat(pid, ppid, cpu, reaped) for pid, ppid, cpu, reaped in rows}


def test_tree_cpu_counts_descendants_leaves_out_others_and_corrects_for_reaped_children() -> None:
    # 1 is the root; 2 a child that exits in between; 3 a child of another database (left out).
    start = sample_tree(1, stats((1, 0, 100, 0), (2, 1, 40, 0), (3, 1, 500, 0), (9, 0, 7, 0)), {3})
    # 2 was reaped with 40 + 10 ticks; 4 is a new child; 5 a grandchild.
    end = sample_tree(
        1, stats((1, 0, 130, 50), (3, 1, 900, 0), (4, 1, 20, 0), (5, 4, 5, 0)), left_out={3}
    )
    spent = cpu_spent(start, end)
    assert spent.live_seconds * CLOCK_TICKS_PER_SECOND == pytest.approx(30 + 20 + 5)
    assert spent.reaped_seconds * CLOCK_TICKS_PER_SECOND == pytest.approx(10)


RELAY_STATEMENTS = [
    SELECT_PENDING.prepare_sql,
    DELETE_PUBLISHED.prepare_sql,
    "SELECT id, payload FROM outbox_events WHERE publish_time IS NULL ORDER BY id LIMIT $1",
    "UPDATE outbox_events SET publish_time = now() WHERE id = ANY($1)",
    "DELETE FROM outbox_events WHERE id IN (SELECT id FROM outbox_events ORDER BY id LIMIT $1"
    " FOR UPDATE SKIP LOCKED) RETURNING id, payload",
]


def test_request_path_writes_are_told_from_the_relays_and_from_reads() -> None:
    # pg_stat_statements shows a prepared statement's PREPARE.
    create, change = INSERT_ANNOUNCED_ORDER.prepare_sql, WRITE_CHANGES.prepare_sql
    assert write_targets(create) == {"orders", "outbox_events"}
    assert write_targets(change) == {
        "orders",
        "order_status_changes",
        "outbox_events",
    }
    assert is_request_path_write(create, toplevel=True)
    assert is_request_path_write(change, toplevel=True)
    assert not is_request_path_write(create, toplevel=False)
    for relay in RELAY_STATEMENTS:
        assert not is_request_path_write(relay, toplevel=True), relay
    lock = "SELECT id FROM orders WHERE id = $1 FOR NO KEY UPDATE"
    assert write_targets(lock) == set()
    upsert = "INSERT INTO orders (id) VALUES ($1)\n  ON CONFLICT (id) DO UPDATE SET id = $1"
    assert write_targets(upsert) == {"orders"}


def test_notify_is_found_in_a_trigger_statement_and_not_in_a_column_name() -> None:
    assert mentions_notify("SELECT pg_notify('outbox_events', '')")
    assert mentions_notify("NOTIFY outbox_events")
    assert not mentions_notify("SELECT notified_at FROM orders")


def test_the_sweep_halves_until_a_share_holds_then_bisects_geometrically() -> None:
    outcomes: list[tuple[float, bool]] = []
    assert next_share(outcomes, start=0.6, floor=0.01) == 0.6
    outcomes.append((0.6, False))
    assert next_share(outcomes, start=0.6, floor=0.01) == pytest.approx(0.3)
    outcomes.append((0.3, True))
    assert next_share(outcomes, start=0.6, floor=0.01) == pytest.approx((0.3 * 0.6) ** 0.5)
    outcomes += [(0.42, True), (0.5, False), (0.46, True)]
    assert best_held(outcomes) == 0.46
    assert next_share(outcomes, start=0.6, floor=0.01) is None  # 0.5 / 0.46 < 1.1


def test_the_sweep_doubles_up_to_the_whole_rate_and_stops_at_the_floor() -> None:
    assert next_share([(0.6, True)], start=0.6, floor=0.01) == 1.0
    assert next_share([(0.6, True), (1.0, True)], start=0.6, floor=0.01) is None
    assert next_share([(0.015, False)], start=0.6, floor=0.01) is None


def test_a_failure_outranks_a_pass_at_a_higher_share() -> None:
    assert best_held([(0.3, True), (0.4, False), (0.5, True)]) == 0.3
    assert best_held([(0.3, False)]) is None


def test_backlog_growth_is_the_least_squares_slope() -> None:
    rising = [(float(t), 10.0 + 3 * t) for t in range(10)]
    assert growth_per_second(rising) == pytest.approx(3.0)
    noisy_but_flat = [(float(t), 5.0 + (t % 2) * 4) for t in range(30)]
    assert is_flat(noisy_but_flat, rate=100)
    assert not is_flat(rising, rate=100)  # 3/s > 2 % of 100/s
    assert growth_per_second([(0.0, 4.0)]) == 0.0


class Refusal:
    def __init__(self, metadata: tuple[tuple[str, bytes], ...]) -> None:
        self._metadata = metadata

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._metadata


def test_retry_info_is_read_from_the_status_details_trailer() -> None:
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1)))
    status = status_pb2.Status(code=8, message="busy", details=[retry])
    with_it = Refusal((("grpc-status-details-bin", status.SerializeToString()),))
    without = Refusal((("grpc-status-details-bin", status_pb2.Status(code=8).SerializeToString()),))
    assert carries_retry_info(cast(grpc.Call, with_it))
    assert not carries_retry_info(cast(grpc.Call, without))
    assert not carries_retry_info(cast(grpc.Call, Refusal(())))


def costs_of(
    orders: int, calls: dict[str, int], statements: list[StatementCalls] | None
) -> WindowCosts:
    sent = SentOrders(calls=orders, first_sent=0.0, last_sent=10.0)
    sent.accepted = {str(n): (0.0, orders_pb2.Order()) for n in range(orders)}
    window = Window(10.0, sent, {str(n): 0.02 for n in range(orders)}, [], 0.1)
    cpu = {"order_service": CpuSpent(1.0, 0.0)}
    return WindowCosts(
        window, cpu, 10.0, {"order_service": 0.01}, Counter(calls), statements,
        commits=3 * orders, sessions=0, kafka_records=2 * orders,
    )  # fmt: skip


def test_structural_figures_count_per_order_against_one_plus_one_over_b() -> None:
    statements = [
        StatementCalls(INSERT_ANNOUNCED_ORDER.prepare_sql, True, 100),
        StatementCalls("WITH changed AS (UPDATE orders SET status = $1) SELECT 1", True, 10),
        StatementCalls(RELAY_STATEMENTS[2], True, 40),
    ]
    calls = {"/ecommerce.v1.OrderService/CreateOrder": 100,
             "/ecommerce.v1.OrderService/BatchUpdateOrderStatus": 10}  # fmt: skip
    by_name = {f.name: f for f in structural(costs_of(100, calls, statements), True)}
    assert by_name["2. B, orders per status callback"].measured.startswith("10.0 ")
    assert by_name["2. gRPC calls per order"].measured == "1.10"
    assert by_name["2. gRPC calls per order"].met is True
    assert by_name["2. WAL-flushing commits per order"].measured == "1.10"
    assert by_name["2. NOTIFY per order"].met is True


def test_structural_figures_say_why_without_pg_stat_statements() -> None:
    calls = {"/ecommerce.v1.OrderService/CreateOrder": 5,
             "/ecommerce.v1.OrderService/UpdateOrderStatus": 5}  # fmt: skip
    by_name = {f.name: f for f in structural(costs_of(5, calls, None), True)}
    assert by_name["2. WAL-flushing commits per order"].measured.startswith("n/a")
    assert by_name["2. WAL-flushing commits per order"].met is None
    assert by_name["2. gRPC calls per order"].target == "≤ 1 + 1/B = 2.00"


def test_results_keep_the_hand_written_history(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\nold table\n\n## Optimisations\n\nby hand\n")
    write_results(results, "# Benchmarks\n\nnew table\n")
    assert results.read_text() == "# Benchmarks\n\nnew table\n\n## Optimisations\n\nby hand\n"
