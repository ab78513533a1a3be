"""What work costs: CPU per process over a window (from /proc) and the exact counters of a
window of orders (commits, statements, Kafka records, RPCs)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bench.counters import (
    STACK_LOG_DIR,
    AccessLog,
    DatabaseCounters,
    StatementCalls,
    TopicOffsets,
    statement_calls_between,
)
from bench.ghz import ghz
from bench.pipeline import Pipeline, Window
from bench.proc import (
    CpuSpent,
    TreeSample,
    cpu_spent,
    kafka_pids,
    postmaster_of,
    read_proc_stats,
    sample_tree,
)
from chaos.stack import Stack

# PostgreSQL publishes a backend's commit counts when it has been idle for up to 10 s
# (PGSTAT_IDLE_INTERVAL): pg_stat_database is read this long after the work.
STATS_SETTLE_SECONDS = 11.0
HEALTH_CHECK = "grpc.health.v1.Health/Check"

CpuSamples = dict[str, list[TreeSample]]


@dataclass
class CpuMeter:
    """CPU of named groups of process trees (one root each, e.g. a service's process)."""

    roots: dict[str, list[int]]
    left_out: Callable[[], set[int]] = set  # PIDs not to count right now
    not_measured: list[str] = field(default_factory=list)  # groups missing, and why

    def sample(self) -> CpuSamples:
        stats = read_proc_stats()
        left_out = self.left_out()
        return {
            name: [sample_tree(root, stats, left_out) for root in roots]
            for name, roots in self.roots.items()
        }

    @staticmethod
    def spent(start: CpuSamples, end: CpuSamples) -> dict[str, CpuSpent]:
        return {name: _total(map(cpu_spent, start[name], end[name])) for name in end}


def _total(spent: Iterable[CpuSpent]) -> CpuSpent:
    parts = list(spent)
    return CpuSpent(sum(p.live_seconds for p in parts), sum(p.reaped_seconds for p in parts))


def stack_cpu_meter(stack: Stack, database: DatabaseCounters, own_backends: set[int]) -> CpuMeter:
    """The stack's processes, PostgreSQL (the postmaster's children, but for backends of other
    databases and this bench's own connections) and the Kafka JVMs."""
    roots = {name: [part.process.pid] for name, part in stack.processes.items()}
    not_measured = []
    postmaster = postmaster_of(min(own_backends))
    if postmaster is not None:
        roots["postgres"] = [postmaster]
    else:
        not_measured.append("postgres (its processes are not in this machine's /proc)")
    if brokers := kafka_pids():
        roots["kafka"] = brokers
    else:
        not_measured.append("kafka (no live PID file of scripts/kafka.sh)")
    return CpuMeter(roots, lambda: database.backends_elsewhere() | own_backends, not_measured)


@dataclass(frozen=True)
class WindowCosts:
    window: Window
    cpu: dict[str, CpuSpent]
    cpu_wall_seconds: float  # between the CPU samples
    idle_cpu: dict[str, float]  # CPU seconds per second with no load, just before
    rpc_calls: Counter[str]  # method -> calls, of every service of the stack
    statements: list[StatementCalls] | None  # None without pg_stat_statements
    commits: int  # xact_commit of the pipeline's database, less this bench's own queries
    sessions: int  # connections opened to the pipeline's database
    kafka_records: int  # written to the orders topic: events and the relay's transaction markers

    @property
    def orders(self) -> int:
        """Orders fully processed: accepted, and seen terminal on the topic."""
        return len(self.window.terminal_at)

    @property
    def cpu_per_order(self) -> float:
        return sum(spent.seconds for spent in self.cpu.values()) / max(self.orders, 1)

    @property
    def busy_cpu_per_order(self) -> float:
        """Less what the processes spend with no load (health probes, relay polls…)."""
        idle = sum(self.idle_cpu.values()) * self.cpu_wall_seconds
        return max(self.cpu_per_order - idle / max(self.orders, 1), 0.0)


@dataclass
class CostCounters:
    database: DatabaseCounters
    orders_topic: TopicOffsets
    log_names: tuple[str, ...] = ("order_service", "user_service")


def measure_costs(
    pipeline: Pipeline,
    meter: CpuMeter,
    counters: CostCounters,
    rate: float,
    seconds: float,
    drain_bound: float,
) -> WindowCosts:
    """A window at `rate`, with every counter read before it and after its orders are
    processed, so that all of their work and nothing else's falls in between."""
    database, probe = counters.database, pipeline.backlog
    pipeline.wait_until_drained(drain_bound)
    # Waiting for the earlier windows' commits to be published is also the idle baseline.
    idle = _cpu_rate(meter, STATS_SETTLE_SECONDS)
    (commits, sessions), queries = database.commits_and_sessions(), probe.queries
    statements = None if database.statements_missing else database.statements()
    records = counters.orders_topic.records()
    logs = [AccessLog(STACK_LOG_DIR / f"{name}.log") for name in counters.log_names]
    cpu, started = meter.sample(), time.monotonic()
    window = pipeline.window(rate, seconds, drain_bound)
    cpu_spent_by, wall = CpuMeter.spent(cpu, meter.sample()), time.monotonic() - started
    made = (
        None if statements is None else statement_calls_between(statements, database.statements())
    )
    records = counters.orders_topic.records() - records
    time.sleep(STATS_SETTLE_SECONDS)  # this window's commits are published, its logs written
    commits_after, sessions_after = database.commits_and_sessions()
    calls: Counter[str] = Counter()
    for log in logs:
        calls += log.calls_since_last_read()
    return WindowCosts(
        window, cpu_spent_by, wall, idle, calls, made,
        commits=commits_after - commits - (probe.queries - queries),
        sessions=sessions_after - sessions,
        kafka_records=records,
    )  # fmt: skip


def _cpu_rate(meter: CpuMeter, seconds: float) -> dict[str, float]:
    """CPU seconds per second of each group over `seconds` of waiting."""
    before, started = meter.sample(), time.monotonic()
    time.sleep(seconds)
    spent, wall = CpuMeter.spent(before, meter.sample()), time.monotonic() - started
    return {name: cpu.seconds / wall for name, cpu in spent.items()}


@dataclass(frozen=True)
class HealthCheckCost:
    cpu_seconds: float  # of the order service
    wall_seconds: float
    calls: int
    rate: float

    @property
    def cpu_per_call(self) -> float:
        return self.cpu_seconds / max(self.calls, 1)

    def busy_cpu_per_call(self, idle_cpu_per_second: float) -> float:
        idle = idle_cpu_per_second * self.wall_seconds
        return max(self.cpu_seconds - idle, 0.0) / max(self.calls, 1)


def measure_health_check(stack: Stack, rate: float, seconds: float) -> HealthCheckCost:
    """The order service's CPU per grpc.health.v1.Health/Check (no work behind it, the same
    server stack), open loop at `rate`."""
    meter = CpuMeter({"order_service": [stack.processes["order_service"].process.pid]})
    before, started = meter.sample(), time.monotonic()
    figures = ghz(stack.address("order_service"), HEALTH_CHECK, {}, 4, seconds, rate)
    spent = CpuMeter.spent(before, meter.sample())["order_service"]
    return HealthCheckCost(spent.seconds, time.monotonic() - started, figures.calls, figures.rps)
