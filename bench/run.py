"""`make bench`: what an order costs, and how many per second the pipeline sustains.

Each figure is a ratio or an exact count from one run on one machine (whose speed drifts:
nothing is compared across runs):
  1. stack CPU per processed order ÷ the order service's CPU per Health/Check (an empty RPC);
  2. gRPC calls, WAL-flushing commits, NOTIFYs, Kafka records per order, and B (orders per
     status callback);
  3. the highest open-loop rate the pipeline sustains (flat backlog, create -> terminal p99 under
     50 ms) ÷ CreateOrder's rate alone, each probe paired with a CreateOrder-only run before it;
  4. the e2e p99 at half that rate; 5. overload at 1.5 times it; 6. CreateOrder and GetOrder
     against their ceilings (Health/Check, pgbench); 7. the outbox over a long run; 8. peak RSS.
Runs two stacks of its own on the infrastructure of `make infra-up`: the pipeline (database
`ecommerce_bench`, topics of its own) and CreateOrder alone (no relay, no processor, no
backpressure; database `ecommerce_pgbench`, shared with pgbench). Prints the figures and the
measurements under them, and writes them to bench/RESULTS.md (`--quick`: only if `--results`).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc
from google.type import money_pb2
from sqlalchemy import make_url

from bench import figures, report
from bench.costs import (
    CostCounters,
    measure_costs,
    measure_health_check,
    stack_cpu_meter,
)
from bench.counters import DatabaseCounters, TopicOffsets
from bench.figures import Figure
from bench.ghz import RpcFigures, ghz, ghz_path
from bench.pipeline import Pipeline, PipelineStuck, SweepPlan, sweep
from bench.proc import checkouts, peak_rss_mb, resident_mb
from bench.tracing_cost import OtlpSink, TracingRounds, variant_env
from bench.watchers import WATCHERS, OpenWatchers, WatcherRounds
from chaos.stack import Stack
from servicekit.local_credentials import admin_channel, tls_of
from servicekit.settings import KafkaSettings, with_password
from testsupport.processes import REPO

PG_PORT = os.environ.get("PGPORT", "55432")  # as scripts/postgres.sh
BENCH_DATABASE_URL = f"postgresql+psycopg2://ecommerce@127.0.0.1:{PG_PORT}/ecommerce_bench"
CREATE_ONLY_DATABASE_URL = f"postgresql+psycopg2://ecommerce@127.0.0.1:{PG_PORT}/ecommerce_pgbench"
CREATE_ORDER = "ecommerce.v1.OrderService/CreateOrder"


@dataclass(frozen=True)
class Profile:
    rpc_seconds: float  # each closed-loop row
    concurrency: tuple[int, ...]
    pair_seconds: float  # each CreateOrder-only run paired with a sweep probe, per concurrency
    sweep: SweepPlan
    cost_seconds: float  # the window at half the sustainable rate, and Health/Check's
    overload_seconds: float
    soak_seconds: float
    producer_records: int


FULL = Profile(
    rpc_seconds=5,
    concurrency=(8, 32),
    pair_seconds=5,
    sweep=SweepPlan(
        start=0.6, floor=1 / 64, probes=6, probe_seconds=15, confirmations=2,
        final_seconds=30, drain_bound=120,
    ),
    cost_seconds=30,
    overload_seconds=60,
    soak_seconds=300,
    producer_records=50_000,
)  # fmt: skip
QUICK = Profile(
    rpc_seconds=2,
    concurrency=(8, 32),
    pair_seconds=2,
    sweep=replace(FULL.sweep, probes=3, probe_seconds=5, confirmations=1, final_seconds=10,
                  drain_bound=60),
    cost_seconds=10,
    overload_seconds=15,
    soak_seconds=30,
    producer_records=10_000,
)  # fmt: skip


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@contextmanager
def timed(part: str, durations: dict[str, float]) -> Iterator[None]:
    started = time.monotonic()
    progress(f"{part}…")
    try:
        yield
    finally:
        durations[part] = time.monotonic() - started


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
    "outbox_traceparents": "ARRAY[NULL::text]",
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


def pgbench_tps(connections: int, seconds: float, user_id: str) -> float:
    """Transactions per second of CreateOrder's statement, straight into PostgreSQL, on the
    CreateOrder-only database (no relay publishes its rows), for an existing user."""
    payload = _sample_order_created(user_id).SerializeToString()
    pg_bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    password = make_url(with_password(CREATE_ONLY_DATABASE_URL)).password
    with (
        tempfile.NamedTemporaryFile("w", suffix=".sql") as file,
        tempfile.NamedTemporaryFile("w", suffix=".pgpass") as pgpass,  # mode 600, as libpq wants
    ):
        file.write(create_order_script(user_id, payload))
        file.flush()
        pgpass.write(f"127.0.0.1:{PG_PORT}:ecommerce_pgbench:ecommerce:{password}\n")
        pgpass.flush()
        completed = subprocess.run(
            [
                str(pg_bin / "pgbench"), "-n", "-h", "127.0.0.1", "-p", PG_PORT, "-U", "ecommerce",
                "-c", str(connections), "-j", "2", "-T", str(round(seconds)), "-M", "prepared",
                "-f", file.name,
                "ecommerce_pgbench",
            ],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
            env={**os.environ, "PGPASSFILE": pgpass.name},
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


def kafka_producer_ceiling(kafka: KafkaSettings, record_size: int, records: int) -> float:
    """Records/s of Kafka's own producer with the outbox relay's settings (mutual TLS included),
    on a topic of its own, as the operator."""
    topic = f"bench-{uuid.uuid4().hex[:8]}.producer-ceiling"
    admin = AdminClient(kafka.client_config())
    key_store = Path(tls_of("admin").key_file).with_suffix(".pem")  # key + certificate, as PEM
    for future in admin.create_topics([NewTopic(topic, num_partitions=3)]).values():
        future.result()
    try:
        completed = subprocess.run(
            [
                "java", "-Xmx256m",
                f"-Dlog4j2.configurationFile={REPO}/infra/kafka/log4j2.properties",
                f"-Dkafka.logs.dir={REPO}/.local/kafka", "-cp", f"{kafka_libs()}/*",
                "org.apache.kafka.tools.ProducerPerformance", "--topic", topic,
                "--num-records", str(records), "--record-size", str(record_size),
                "--throughput", "-1", "--producer-props",
                f"bootstrap.servers={kafka.bootstrap_servers}", "security.protocol=SSL",
                "ssl.keystore.type=PEM", f"ssl.keystore.location={key_store}",
                "ssl.truststore.type=PEM", f"ssl.truststore.location={tls_of('admin').ca_file}",
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


def kafka_libs() -> Path:
    """Kafka's jars, fetched by scripts/kafka.sh (in the checkout that ran it)."""
    found = (c / ".local" / "kafka" / "libs" for c in checkouts())
    return next((path for path in found if path.exists()), REPO / ".local" / "kafka" / "libs")


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory:.0f} GiB"


Call = tuple[str, str, dict[str, object]]  # address, method, request as JSON


def seed(users_at: str, orders_at: str) -> tuple[str, str]:
    """A user and an order for the read RPCs; returns their ids."""
    with admin_channel(users_at) as u, admin_channel(orders_at) as o:
        user = users_pb2_grpc.UserServiceStub(u).CreateUser(
            users_pb2.CreateUserRequest(email=f"b.{uuid.uuid4().hex}@example.com", name="B")
        )
        order = orders_pb2_grpc.OrderServiceStub(o).CreateOrder(
            orders_pb2.CreateOrderRequest(
                user_id=user.id, amount=money_pb2.Money(currency_code="USD", units=42)
            )
        )
    return user.id, order.id


def rpc_calls(stack: Stack, user_id: str, order_id: str) -> dict[str, Call]:
    users_at, orders_at = stack.address("user_service"), stack.address("order_service")
    return {
        "Health/Check": (orders_at, "grpc.health.v1.Health/Check", {}),
        "CreateUser": (users_at, "ecommerce.v1.UserService/CreateUser",
                       {"email": "b{{newUUID}}@example.com", "name": "Bench"}),
        "GetUser": (users_at, "ecommerce.v1.UserService/GetUser", {"id": user_id}),
        "CreateOrder": (orders_at, CREATE_ORDER, create_order_request(user_id)),
        "GetOrder": (orders_at, GET_ORDER, {"id": order_id}),
        "ListOrders": (orders_at, "ecommerce.v1.OrderService/ListOrders",
                       {"user_id": user_id, "page_size": 20}),
    }  # fmt: skip


GET_ORDER = "ecommerce.v1.OrderService/GetOrder"


def create_order_request(user_id: str) -> dict[str, object]:
    return {"user_id": user_id, "amount": {"currency_code": "USD", "units": "42"}}


def rpc_rows(
    calls: dict[str, Call], concurrency: int, seconds: float
) -> tuple[list[str], dict[str, float]]:
    """Table rows for each RPC at one concurrency (the first, Health/Check, is the ceiling),
    and each one's RPC/s."""
    measured: dict[str, RpcFigures] = {}
    for name, (address, method, data) in calls.items():
        measured[name] = ghz(address, method, data, concurrency, seconds)
    ceiling = measured["Health/Check"]
    rows = [row(name, concurrency, figures, ceiling) for name, figures in measured.items()]
    return rows, {name: figures.rps for name, figures in measured.items()}


def row(name: str, concurrency: int, figures: RpcFigures, ceiling: RpcFigures) -> str:
    return (
        f"| {name} | {concurrency} | {figures.rps:.0f} | {figures.p50_ms:.1f}"
        f" | {figures.p99_ms:.1f} | {figures.errors} | {figures.rps / ceiling.rps:.2f} |"
    )


def create_only_rate(stack: Stack, user_id: str, profile: Profile) -> Callable[[], float]:
    """CreateOrder alone, closed loop: the best of the profile's concurrencies."""
    data = create_order_request(user_id)

    def measure() -> float:
        address = stack.address("order_service")
        return max(
            ghz(address, CREATE_ORDER, data, c, profile.pair_seconds).rps
            for c in profile.concurrency
        )

    return measure


def data_access_rows(database_url: str) -> list[str]:
    # Imported when used: `--skip data` measures revisions that predate servicekit.sql.
    from bench.data_access import data_access_rows as rows

    return rows(database_url)


@dataclass
class Run:
    """What one run gathers: the figures, the tables under them, the time each part took."""

    profile: Profile
    skip: set[str]
    figures: list[Figure]
    sections: list[list[str]]
    durations: dict[str, float]

    def part(self, name: str) -> AbstractContextManager[None]:
        return timed(name, self.durations)


def run_rpcs(run: Run, create_only: Stack) -> str:
    """Closed-loop rows and their ceilings, on the CreateOrder-only stack; returns its user."""
    user_id, order_id = seed(
        create_only.address("user_service"), create_only.address("order_service")
    )
    calls = rpc_calls(create_only, user_id, order_id)
    rates: dict[int, dict[str, float]] = {}
    lines = report.RPC_HEADER.copy()
    with run.part("RPC rows"):
        for concurrency in run.profile.concurrency:
            rows, rates[concurrency] = rpc_rows(calls, concurrency, run.profile.rpc_seconds)
            lines += rows
    run.sections.append(lines)
    if "ceilings" in run.skip:
        run.figures.append(
            Figure("6. CreateOrder and GetOrder ÷ ceilings", "n/a: --skip ceilings", "-", None)
        )
        return user_id
    with run.part("ceilings (pgbench, Kafka producer)"):
        tps = {c: pgbench_tps(c, run.profile.rpc_seconds, user_id) for c in rates}
        producer = kafka_producer_ceiling(create_only.kafka, 300, run.profile.producer_records)
    for concurrency, by_name in rates.items():
        run.figures += figures.additive_ceiling(concurrency, by_name, tps[concurrency])
    run.sections.append(report.ceiling_rows(rates, tps, producer))
    return user_id


# The CreateOrder-only stack's settings; its plaintext twin adds GRPC_INSECURE=true.
CREATE_ONLY_ENV = {"OUTBOX_RELAY_ENABLED": "false", "BACKPRESSURE_ENABLED": "false"}


def run_tls_cost(run: Run, create_only: Stack, user_id: str) -> None:
    """What mutual TLS costs: Health/Check and CreateOrder against the CreateOrder-only stack's
    order_service and against a plaintext twin on the same database, alternated, same
    concurrency. Both send the same bearer token."""
    plain = Stack(
        extra_env={**CREATE_ONLY_ENV, "GRPC_INSECURE": "true"},
        database_url=CREATE_ONLY_DATABASE_URL,
    )
    concurrency = max(run.profile.concurrency)
    lines = report.TLS_HEADER.copy()
    calls = {
        "Health/Check": ("grpc.health.v1.Health/Check", {}),
        "CreateOrder": (CREATE_ORDER, create_order_request(user_id)),
    }
    ratios = {}
    try:
        plain.start("order_service")
        with run.part("TLS against plaintext"):
            for name, (method, data) in calls.items():
                seconds = run.profile.rpc_seconds
                tls = ghz(create_only.address("order_service"), method, data, concurrency, seconds)
                clear = ghz(
                    plain.address("order_service"), method, data, concurrency, seconds,
                    plaintext=True,
                )  # fmt: skip
                ratios[name] = tls.rps / clear.rps
                lines.append(report.tls_row(name, concurrency, tls, clear))
    finally:
        plain.stop_all()
    run.sections.append(lines)
    run.figures.append(figures.tls_cost(ratios))


TRACING_ROUNDS = 3


def run_tracing_cost(run: Run, user_id: str) -> None:
    """What tracing costs: CreateOrder on three order_service twins of the CreateOrder-only stack
    (same database), tracing off, on as shipped, and exporting; the variants alternate within
    each round, and each ratio is the median of its rounds'."""
    sink = OtlpSink()
    twins = {
        name: Stack(extra_env={**CREATE_ONLY_ENV, **env}, database_url=CREATE_ONLY_DATABASE_URL)
        for name, env in variant_env(sink).items()
    }
    concurrency, seconds = max(run.profile.concurrency), run.profile.rpc_seconds
    rounds = TracingRounds()
    try:
        for twin in twins.values():
            twin.start("order_service")
        with run.part("tracing on against off"):
            for _ in range(TRACING_ROUNDS):
                for name, twin in twins.items():
                    address = twin.address("order_service")
                    data = create_order_request(user_id)
                    rounds.add(name, ghz(address, CREATE_ORDER, data, concurrency, seconds))
    finally:
        for twin in twins.values():
            twin.stop_all()
        sink.stop()
    run.sections.append(report.tracing_rows(rounds, concurrency, sink.spans))
    run.figures.append(figures.tracing_cost(rounds, sink.spans))


WATCH_ROUNDS = 2


def run_watch_cost(run: Run, create_only: Stack, user_id: str) -> None:
    """What open WatchOrder streams cost: GetOrder closed loop on the CreateOrder-only stack's
    order_service without watchers, then with a thousand open (orders that stay CREATED: that
    stack has no relay), alternated; and what the streams add to the process's memory."""
    address = create_only.address("order_service")
    process = create_only.processes["order_service"].process
    with admin_channel(address) as channel:
        stub = orders_pb2_grpc.OrderServiceStub(channel)
        request = orders_pb2.CreateOrderRequest(
            user_id=user_id, amount=money_pb2.Money(currency_code="USD", units=1)
        )
        watched = [stub.CreateOrder(request, timeout=30).id for _ in range(WATCHERS)]
    concurrency, seconds = max(run.profile.concurrency), run.profile.rpc_seconds
    rounds, memory = WatcherRounds(), []
    with run.part(f"GetOrder with {WATCHERS} open WatchOrder streams against without"):
        for _ in range(WATCH_ROUNDS):
            data: dict[str, object] = {"id": watched[0]}
            rounds.without.append(ghz(address, GET_ORDER, data, concurrency, seconds))
            before = resident_mb(process.pid)
            watchers = OpenWatchers(address, watched)
            try:
                if not watchers.wait_open(120):
                    raise RuntimeError(f"only {watchers.open_streams} of {WATCHERS} streams opened")
                memory.append(resident_mb(process.pid) - before)
                rounds.with_watchers.append(ghz(address, GET_ORDER, data, concurrency, seconds))
            finally:
                watchers.close()
    run.sections.append(report.watcher_rows(rounds, concurrency, WATCHERS, memory))
    run.figures.append(figures.watch_cost(rounds, WATCHERS, statistics.median(memory)))


def run_pipeline(run: Run, stack: Stack, reference: Callable[[], float]) -> None:
    pipeline = Pipeline(stack)
    database = DatabaseCounters(stack.database_url)
    counters = CostCounters(database, TopicOffsets(stack.kafka, stack.kafka.orders_topic))
    try:
        sustainable = run_sweep(run, pipeline, reference)
        run_costs(run, pipeline, counters, sustainable / 2)
        if "overload" not in run.skip:
            run_overload(run, pipeline, sustainable, reference)
        if "soak" not in run.skip:
            run_soak(run, pipeline, sustainable)
    except PipelineStuck as stuck:
        run.sections.append([f"The pipeline part stopped: {stuck}."])
    finally:
        pipeline.close()
        counters.orders_topic.close()
        database.close()


def run_sweep(run: Run, pipeline: Pipeline, reference: Callable[[], float]) -> float:
    """Figure 3; returns the sustainable rate the later windows are set from."""
    with run.part("sweep (A/B pairs)"):
        result = sweep(pipeline, reference, run.profile.sweep)
    run.sections.append(report.sweep_rows(result.probes))
    if result.result is not None:
        run.figures.append(figures.sustained(result.result, result.probes))
        return result.result.share * result.result.create_only_rate
    # Nothing held: the later windows run at half the lowest rate tried, and say so.
    stand_in = min(p.share * p.create_only_rate for p in result.probes) / 2
    run.figures.append(figures.sustained(None, result.probes, stand_in))
    return stand_in


def run_costs(run: Run, pipeline: Pipeline, counters: CostCounters, rate: float) -> None:
    """Figures 1, 2 and 4, from one window at `rate`, then Health/Check at the same rate."""
    own = {pipeline.backlog.backend_pid}
    meter = stack_cpu_meter(pipeline.stack, counters.database, own)
    seconds, bound = run.profile.cost_seconds, run.profile.sweep.drain_bound
    with run.part("costs at half the sustainable rate"):
        costs = measure_costs(pipeline, meter, counters, rate, seconds, bound)
        health = measure_health_check(pipeline.stack, rate, seconds)
    run.figures.append(figures.cost_ratio(costs, health, meter.not_measured))
    run.figures += figures.structural(costs, counters.database.tracks_nested_statements)
    run.figures.append(figures.half_rate_latency(costs.window))
    run.sections.append(report.cost_rows(costs, health))
    run.sections.append(report.statement_rows(costs, counters.database.statements_missing))


# A share of CreateOrder's own max rate past what the pipeline processes at all (its sustainable
# rate is bound by its latency, far below that), so that CreateOrder has to shed.
BEYOND_THROUGHPUT = 0.7


def run_overload(
    run: Run, pipeline: Pipeline, sustainable: float, reference: Callable[[], float]
) -> None:
    windows = []
    with run.part("overload at 1.5 times the sustainable rate"):
        window = pipeline.window(
            1.5 * sustainable, run.profile.overload_seconds, run.profile.sweep.drain_bound
        )
    run.figures += figures.overload(window, sustainable, pipeline.backlog)
    windows.append(window)
    with run.part(f"overload at {BEYOND_THROUGHPUT:g} of CreateOrder's own max rate"):
        rate = BEYOND_THROUGHPUT * reference()
        window = pipeline.window(rate, run.profile.overload_seconds, run.profile.sweep.drain_bound)
    label = f"5b. overload at {BEYOND_THROUGHPUT:g} of CreateOrder's max"
    run.figures += figures.overload(window, sustainable, pipeline.backlog, label)
    windows.append(window)
    run.sections.append(report.window_rows("overload", windows))


def run_soak(run: Run, pipeline: Pipeline, sustainable: float) -> None:
    seconds = run.profile.soak_seconds
    with run.part(f"soak, {seconds:.0f} s at the sustainable rate"):
        window = pipeline.window(
            sustainable, seconds, run.profile.sweep.drain_bound, sample_every=min(15, seconds / 6)
        )
    samples = [(t, backlog.outbox_rows) for t, backlog in window.backlog]
    run.figures.append(figures.soak(window, samples))
    run.sections.append(report.window_rows("soak", [window]))


def peak_memory(stacks: dict[str, Stack]) -> dict[str, float]:
    return {
        f"{label}{name}": peak_rss_mb(part.process.pid)
        for label, stack in stacks.items()
        for name, part in stack.processes.items()
    }


def run_all(profile: Profile, skip: set[str]) -> Run:
    run = Run(profile, skip, [], [], {})
    pipeline_stack = Stack(database_url=BENCH_DATABASE_URL)
    create_only = Stack(extra_env=CREATE_ONLY_ENV, database_url=CREATE_ONLY_DATABASE_URL)
    stacks = {"": pipeline_stack, "CreateOrder-only ": create_only}
    try:
        with run.part("stacks start"):
            for stack in stacks.values():
                stack.prepare()
            pipeline_stack.start_all()
            create_only.start("user_service")
            create_only.start("order_service")
        user_id = run_rpcs(run, create_only)
        run_tls_cost(run, create_only, user_id)
        run_tracing_cost(run, user_id)
        run_watch_cost(run, create_only, user_id)
        if "pipeline" not in skip:
            run_pipeline(run, pipeline_stack, create_only_rate(create_only, user_id, profile))
        if "data" not in skip:
            with run.part("data access"):
                run.sections.append(report.DATA_ACCESS_INTRO + data_access_rows(BENCH_DATABASE_URL))
        memory = peak_memory(stacks)
        run.figures.append(figures.peak_rss(memory))
    finally:
        for stack in stacks.values():
            stack.stop_all()
            delete_topics(stack.kafka)
    return run


def delete_topics(kafka: KafkaSettings) -> None:
    """The run's own topics: every partition left on the shared broker costs it CPU."""
    admin = AdminClient(kafka.client_config())
    names = [kafka.orders_topic, kafka.users_topic, kafka.orders_dlq_topic]
    for future in admin.delete_topics(names, operation_timeout=30).values():
        future.result()


SKIPPABLE = ["ceilings", "pipeline", "overload", "soak", "data"]
# What `make bench` rewrites ends here: the hand-written history below it is kept.
HISTORY_HEADING = "\n## Optimisations"


def write_results(path: Path, text: str) -> None:
    previous = path.read_text() if path.exists() else ""
    history = previous[previous.index(HISTORY_HEADING) :] if HISTORY_HEADING in previous else ""
    path.write_text(text.rstrip("\n") + "\n" + history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a development run of a few minutes")
    parser.add_argument("--soak-seconds", type=float, help="the long run at the sustainable rate")
    parser.add_argument("--seconds", type=float, help="per closed-loop RPC row")
    parser.add_argument("--concurrency", type=int, nargs="+", help="of the closed-loop rows")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=SKIPPABLE,
        help="parts to leave out (the RPC rows always run)",
    )  # fmt: skip
    parser.add_argument(
        "--results", type=Path, help="where to write (default bench/RESULTS.md, none with --quick)"
    )
    args = parser.parse_args()
    profile = QUICK if args.quick else FULL
    overrides = {"soak_seconds": args.soak_seconds, "rpc_seconds": args.seconds,
                 "concurrency": tuple(args.concurrency or ()) or None}  # fmt: skip
    profile = replace(profile, **{k: v for k, v in overrides.items() if v is not None})
    if not ghz_path().exists():
        raise SystemExit("ghz is not installed: bash scripts/tools.sh --with-ghz")
    started = datetime.now(UTC)
    run = run_all(profile, set(args.skip))
    text = report.document(run.figures, run.sections, run.durations, started, machine())
    print(text)
    results = args.results or (None if args.quick else REPO / "bench" / "RESULTS.md")
    if results is not None:
        write_results(results, text)


if __name__ == "__main__":
    main()
