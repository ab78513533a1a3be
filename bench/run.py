"""`make bench`: throughput and latency of each RPC, the pipeline's end-to-end latency and the
services' memory, each figure beside the ceiling of the part it stands on, measured in the same
run on the same machine:
  - RPC ceiling: grpc.health.v1.Health/Check (no work behind it) through the same server stack;
  - DB ceiling: pgbench running CreateOrder's SQL (order + outbox insert, one transaction);
  - Kafka ceiling: Kafka's ProducerPerformance with the settings of the outbox relay.
Runs its own stack (database `ecommerce_bench`, topics of its own) on the infrastructure of
`make infra-up`; prints a table and writes it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc
from google.type import money_pb2
from sqlalchemy import create_engine, text

from bench.e2e_latency import measure
from chaos.processes import REPO, wait_until
from chaos.stack import Stack
from servicekit.schema import recreate_disposable_database

BENCH_DATABASE_URL = "postgresql+psycopg2://ecommerce@127.0.0.1:55432/ecommerce_bench"
PGBENCH_DATABASE_URL = "postgresql+psycopg2://ecommerce@127.0.0.1:55432/ecommerce_pgbench"
GHZ = REPO / ".local" / "bin" / "ghz"
GRPCURL = REPO / ".local" / "bin" / "grpcurl"
_PROTOSETS = Path(tempfile.mkdtemp(prefix="bench-protosets-"))


def protoset(address: str, service: str) -> Path:
    """The service's descriptors, read by grpcurl through reflection (ghz's own reflection
    client does not find the health service), cached per service."""
    path = _PROTOSETS / f"{service}.protoset"
    if not path.exists():
        subprocess.run(
            [str(GRPCURL), "-plaintext", "-protoset-out", str(path), address, "describe", service],
            capture_output=True, check=True, timeout=30,
        )  # fmt: skip
    return path


@dataclass(frozen=True)
class RpcFigures:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def ghz(
    address: str, call: str, data: dict[str, object], concurrency: int, seconds: int
) -> RpcFigures:
    completed = subprocess.run(
        [
            str(GHZ), "--insecure", "--call", call, "-d", json.dumps(data),
            "--protoset", str(protoset(address, call.split("/")[0])),
            "-c", str(concurrency), "--connections", str(min(concurrency, 4)),
            "-z", f"{seconds}s", "-O", "json", address,
        ],
        capture_output=True, text=True, timeout=seconds + 120, check=True,
    )  # fmt: skip
    report = json.loads(completed.stdout)
    latency = {d["percentage"]: d["latency"] / 1e6 for d in report["latencyDistribution"] or []}
    # "Canceled": the calls still in flight when the duration ended, cut off by ghz itself.
    errors = sum(
        n for code, n in report["statusCodeDistribution"].items() if code not in ("OK", "Canceled")
    )
    return RpcFigures(report["rps"], latency.get(50, 0.0), latency.get(99, 0.0), errors)


# pgbench's stand-ins for the parameters of CreateOrder's statement.
_PGBENCH_VALUES = {
    "id": "gen_random_uuid()",
    "amount": ":units",
    "currency_code": "'USD'",
    "status": "'CREATED'",
    "status_reason": "''",
    "create_time": "now()",
    "update_time": "now()",
    "request_id": "NULL",
    "outbox_event_ids": "ARRAY[gen_random_uuid()]",
    "outbox_topics": "ARRAY['pgbench']",
    "outbox_types": "ARRAY['ecommerce.events.v1.OrderCreated']",
    "outbox_sources": "ARRAY['/bench']",
    "outbox_times": "ARRAY[now()]",
}


def create_order_script(user_id: str, payload: bytes) -> str:
    """CreateOrder's own statement (order + outbox event), its parameters as pgbench values."""
    values = {
        **_PGBENCH_VALUES,
        "user_id": f"'{user_id}'",
        "outbox_keys": f"ARRAY['{user_id}']",
        "outbox_payloads": f"ARRAY['\\x{payload.hex()}'::bytea]",
    }
    from order_service.service import INSERT_ANNOUNCED_ORDER  # see data_access_rows

    sql = re.sub(r"%\((\w+)\)s", lambda m: values[m.group(1)], INSERT_ANNOUNCED_ORDER.sql)
    return f"\\set units random(1, 100)\n{sql.strip()};\n"


def pgbench_tps(connections: int, seconds: int) -> float:
    """Transactions per second of CreateOrder's statement, straight into PostgreSQL, on a database
    of its own with the same schema (no relay publishes its rows)."""
    recreate_disposable_database(PGBENCH_DATABASE_URL)
    user_id = str(uuid.uuid4())
    engine = create_engine(PGBENCH_DATABASE_URL)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO users (id, email, name) VALUES (:id, 'pgbench@example.com', 'B')"),
            {"id": user_id},
        )
    engine.dispose()
    payload = _sample_order_created(user_id).SerializeToString()
    pg_bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as file:
        file.write(create_order_script(user_id, payload))
        file.flush()
        completed = subprocess.run(
            [
                str(pg_bin / "pgbench"), "-n", "-h", "127.0.0.1", "-p", "55432", "-U", "ecommerce",
                "-c", str(connections), "-j", "2", "-T", str(seconds), "-M", "prepared",
                "-f", file.name,
                "ecommerce_pgbench",
            ],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
        )  # fmt: skip
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", completed.stdout)
    if not match:
        raise RuntimeError(f"pgbench said: {completed.stdout}{completed.stderr}")
    return float(match.group(1))


def _sample_order_created(user_id: str) -> events_pb2.OrderCreated:
    """An OrderCreated of the size CreateOrder writes."""
    event = events_pb2.OrderCreated(
        event_id=str(uuid.uuid4()),
        order=orders_pb2.Order(
            id=str(uuid.uuid4()),
            user_id=user_id,
            amount=money_pb2.Money(currency_code="USD", units=42),
            status=orders_pb2.ORDER_STATUS_CREATED,
        ),
    )
    event.occur_time.GetCurrentTime()
    event.order.create_time.CopyFrom(event.occur_time)
    event.order.update_time.CopyFrom(event.occur_time)
    return event


def kafka_producer_ceiling(bootstrap: str, record_size: int, records: int = 50_000) -> float:
    """Records/s of Kafka's own producer with the outbox relay's settings, on a topic of its own."""
    topic = f"bench-{uuid.uuid4().hex[:8]}.producer-ceiling"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=3)]).values():
        future.result()
    try:
        completed = subprocess.run(
            [
                "java", "-Xmx256m",
                f"-Dlog4j2.configurationFile={REPO}/infra/kafka/log4j2.properties",
                f"-Dkafka.logs.dir={REPO}/.local/kafka", "-cp", f"{REPO}/.local/kafka/libs/*",
                "org.apache.kafka.tools.ProducerPerformance", "--topic", topic,
                "--num-records", str(records), "--record-size", str(record_size),
                "--throughput", "-1", "--producer-props", f"bootstrap.servers={bootstrap}",
                "acks=all", "enable.idempotence=true", "linger.ms=2", "compression.type=lz4",
            ],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
    finally:
        for future in admin.delete_topics([topic]).values():
            future.result()
    match = re.findall(r"([\d.]+) records/sec", completed.stdout)
    if not match:
        raise RuntimeError(f"ProducerPerformance said: {completed.stdout}{completed.stderr}")
    return float(match[-1])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory:.0f} GiB"


Call = tuple[str, str, dict[str, object]]  # address, method, request as JSON


def seed(users_at: str, orders_at: str) -> tuple[str, str]:
    """A user and an order for the read RPCs; returns their ids."""
    with grpc.insecure_channel(users_at) as u, grpc.insecure_channel(orders_at) as o:
        user = users_pb2_grpc.UserServiceStub(u).CreateUser(
            users_pb2.CreateUserRequest(email=f"b.{uuid.uuid4().hex}@example.com", name="B")
        )
        order = orders_pb2_grpc.OrderServiceStub(o).CreateOrder(
            orders_pb2.CreateOrderRequest(
                user_id=user.id, amount=money_pb2.Money(currency_code="USD", units=42)
            )
        )
    return user.id, order.id


def rpc_rows(
    stack: Stack, calls: dict[str, Call], concurrency: int, seconds: int
) -> tuple[list[str], float]:
    """Table rows for each RPC at one concurrency, and the CreateOrder rate reached. Each row
    starts once the orders of the one before are processed, so that it runs alone."""
    wait_for_backlog(stack.database_url)
    ceiling = ghz(
        stack.address("order_service"), "grpc.health.v1.Health/Check", {}, concurrency, seconds
    )
    rows = [row("Health/Check (ceiling)", concurrency, ceiling, ceiling)]
    create_order_rate = 0.0
    for name, (address, method, data) in calls.items():
        wait_for_backlog(stack.database_url)
        figures = ghz(address, method, data, concurrency, seconds)
        if name == "CreateOrder":
            create_order_rate = figures.rps
        rows.append(row(name, concurrency, figures, ceiling))
    return rows, create_order_rate


def row(name: str, concurrency: int, figures: RpcFigures, ceiling: RpcFigures) -> str:
    return (
        f"| {name} | {concurrency} | {figures.rps:.0f} | {figures.p50_ms:.1f}"
        f" | {figures.p99_ms:.1f} | {figures.errors} | {figures.rps / ceiling.rps:.2f} |"
    )


def ceiling_rows(bootstrap: str, create_order: dict[int, float], seconds: int) -> list[str]:
    rows = [
        "| ceiling | concurrency | per second | CreateOrder ÷ ceiling |",
        "|---|---:|---:|---:|",
    ]
    for concurrency, rate in create_order.items():
        tps = pgbench_tps(concurrency, seconds)
        rows.append(
            f"| pgbench, CreateOrder's SQL | {concurrency} | {tps:.0f} | {rate / tps:.2f} |"
        )
    producer = kafka_producer_ceiling(bootstrap, record_size=300)
    rows.append(f"| Kafka ProducerPerformance, 300 B, acks=all | - | {producer:.0f} | - |")
    return rows


def wait_for_backlog(database_url: str, timeout: float = 600) -> None:
    """The CreateOrder runs leave thousands of orders to process: latency is measured after."""
    engine = create_engine(database_url)
    query = text("SELECT count(*) FROM orders WHERE status = 'CREATED'")
    try:
        with engine.connect() as connection:
            wait_until(lambda: connection.scalar(query) == 0, timeout=timeout, interval=0.5)
    finally:
        engine.dispose()


def e2e_rows(stack: Stack, best_create_rate: float, shares: list[float]) -> list[str]:
    """Latency at shares of the best CreateOrder rate (by default half, then full: whether the
    pipeline keeps up, processed/s against sent/s, and what that does to latency)."""
    users_at, orders_at = stack.address("user_service"), stack.address("order_service")
    rows = [
        "| offered orders/s | sent/s | processed/s | terminal | latency ms"
        " | p50 | p95 | p99 | max |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for share in shares:
        rate = best_create_rate * share
        label = {0.5: "half", 1.0: "full"}.get(share, f"{share:g}")
        wait_for_backlog(stack.database_url)
        e2e = measure(stack.kafka, users_at, orders_at, int(min(5000, rate * 10)), rate, 120)
        for cut_label, cut in (
            ("create -> PROCESSED recorded", e2e.recorded_ms),
            ("call -> OrderStatusChanged seen", e2e.observed_ms),
        ):
            figures = " | ".join(f"{cut[k]:.1f}" for k in ("p50", "p95", "p99", "max"))
            rows.append(
                f"| {rate:.0f} ({label}) | {e2e.sent_per_second:.0f}"
                f" | {e2e.processed_per_second:.0f} | {e2e.completed}/{e2e.sent}"
                f" | {cut_label} | {figures} |"
            )
    return rows


def data_access_rows(database_url: str) -> list[str]:
    # Imported when used: `--skip ceilings data` measures revisions that predate servicekit.sql.
    from bench.data_access import data_access_rows as rows

    return rows(database_url)


def run(stack: Stack, args: argparse.Namespace) -> list[str]:
    users_at, orders_at = stack.address("user_service"), stack.address("order_service")
    user_id, order_id = seed(users_at, orders_at)
    calls: dict[str, Call] = {
        "CreateUser": (users_at, "ecommerce.v1.UserService/CreateUser",
                       {"email": "b{{newUUID}}@example.com", "name": "Bench"}),
        "GetUser": (users_at, "ecommerce.v1.UserService/GetUser", {"id": user_id}),
        "CreateOrder": (orders_at, "ecommerce.v1.OrderService/CreateOrder",
                        {"user_id": user_id, "amount": {"currency_code": "USD", "units": "42"}}),
        "GetOrder": (orders_at, "ecommerce.v1.OrderService/GetOrder", {"id": order_id}),
        "ListOrders": (orders_at, "ecommerce.v1.OrderService/ListOrders",
                       {"user_id": user_id, "page_size": 20}),
    }  # fmt: skip
    lines = [
        "| RPC | concurrency | RPC/s | p50 ms | p99 ms | not OK (incl. cut off at the end)"
        " | RPC/s ÷ RPC ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    create_order: dict[int, float] = {}
    for concurrency in args.concurrency:
        rows, create_order[concurrency] = rpc_rows(stack, calls, concurrency, args.seconds)
        lines += rows
    best_create_rate = max(create_order.values())
    if "ceilings" not in args.skip:
        lines += ["", *ceiling_rows(stack.kafka.bootstrap_servers, create_order, args.seconds)]
    if "e2e" not in args.skip:
        lines += [
            "",
            "End to end (orders of 32 users, sent open-loop at a fixed rate; 'full' is the best"
            " CreateOrder rate above):",
            "",
            *e2e_rows(stack, max(20.0, best_create_rate), args.e2e_shares),
        ]
    if "data" not in args.skip:
        lines += ["", "Data access on the request path (`python -m bench.data_access`):", ""]
        lines += data_access_rows(stack.database_url)
    lines += ["", "| process | peak RSS MB |", "|---|---:|"]
    lines += [
        f"| {name} | {peak_rss_mb(process.process.pid):.0f} |"
        for name, process in stack.processes.items()
    ]
    return lines


# What `make bench` rewrites ends here: the hand-written history below it is kept.
HISTORY_HEADING = "\n## Optimisations"


def write_results(path: Path, args: argparse.Namespace, report: str) -> None:
    previous = path.read_text() if path.exists() else ""
    history = previous[previous.index(HISTORY_HEADING) :] if HISTORY_HEADING in previous else ""
    path.write_text(
        f"# Benchmarks\n\n`make bench` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()},"
        f" load generator (ghz, {args.seconds} s per row) on the same machine.\n\n{report}\n"
        f"{history}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=5, help="per RPC measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument(
        "--e2e-shares", type=float, nargs="+", default=[0.5, 1.0],
        help="end-to-end runs, as shares of the best CreateOrder rate",
    )  # fmt: skip
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["ceilings", "e2e", "data"],
        help="parts to leave out (the RPC rows always run)",
    )  # fmt: skip
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args()
    if not GHZ.exists():
        raise SystemExit("ghz is not installed: bash scripts/tools.sh --with-ghz")
    stack = Stack(database_url=BENCH_DATABASE_URL)
    stack.prepare()
    try:
        stack.start_all()
        report = "\n".join(run(stack, args))
    finally:
        stack.stop_all()
    print(report)
    write_results(args.results, args, report)


if __name__ == "__main__":
    main()
