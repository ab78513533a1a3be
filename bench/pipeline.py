"""Open-loop windows through the whole pipeline (CreateOrder, outbox relay, Kafka, processor,
status callback): orders of 32 users sent at a fixed rate, each timed from its CreateOrder call to
its OrderStatusChanged seen on the topic, while the backlog (orders still CREATED plus outbox rows
not yet published) is sampled; and the sweep for the highest rate the pipeline sustains."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ecommerce.v1 import orders_pb2_grpc

from bench.counters import OUTBOX_TABLE, connect
from bench.e2e_latency import SentOrders, create_users, percentiles, send_at_rate, start_watcher
from chaos.stack import Stack
from servicekit.local_credentials import admin_channel

P99_BOUND_MS = 50.0
# How fast the backlog may grow over a window and still count as flat (noise, batching).
FLAT_SHARE_OF_RATE = 0.02
FLAT_FLOOR_PER_SECOND = 0.5
# Below this share of what it offered, the sender (this process) could not keep up.
SENDER_SHORTFALL = 0.9
USERS = 32


@dataclass(frozen=True)
class Backlog:
    created: int  # orders still CREATED
    unpublished: int  # outbox rows the relay has not published yet
    outbox_rows: int  # every row of the outbox table

    @property
    def total(self) -> int:
        return self.created + self.unpublished


class BacklogProbe:
    """Reads the backlog from the pipeline's database, on a connection of its own whose queries
    it counts (they are commits of that database too)."""

    def __init__(self, database_url: str) -> None:
        self._connection = connect(database_url)
        self.queries = 0
        self.backend_pid = int(self._one("SELECT pg_backend_pid()")[0])
        # Until the relay deletes what it publishes, published rows stay, marked.
        marks = self._one(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = %s AND column_name = 'publish_time'",
            (OUTBOX_TABLE,),
        )[0]
        unpublished = " WHERE publish_time IS NULL" if marks else ""
        self._sql = (
            "SELECT (SELECT count(*) FROM orders WHERE status = 'CREATED'),"
            f" (SELECT count(*) FROM {OUTBOX_TABLE}{unpublished}),"
            f" (SELECT count(*) FROM {OUTBOX_TABLE})"
        )

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> tuple[int, ...]:
        with self._connection.cursor() as cursor:
            cursor.execute(sql, params)
            row: tuple[int, ...] = cursor.fetchone()
            self.queries += 1
            return row

    def read(self) -> Backlog:
        return Backlog(*self._one(self._sql))

    def still_created(self, order_ids: Iterable[str]) -> int:
        """How many of these orders are not in a terminal status (or do not exist)."""
        ids = list(order_ids)
        terminal = self._one(
            "SELECT count(*) FROM orders WHERE id = ANY(%s::uuid[]) AND status <> 'CREATED'",
            (ids,),
        )[0]
        return len(ids) - terminal

    def close(self) -> None:
        self._connection.close()


def growth_per_second(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples; 0 with fewer than two."""
    if len(samples) < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / len(samples)
    mean_v = sum(v for _, v in samples) / len(samples)
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in samples) / spread


def is_flat(samples: Sequence[tuple[float, float]], rate: float) -> bool:
    return growth_per_second(samples) <= max(FLAT_SHARE_OF_RATE * rate, FLAT_FLOOR_PER_SECOND)


@dataclass(frozen=True)
class Window:
    """One open-loop window: what was sent, when each accepted order was seen terminal, the
    backlog while sending and how long it took to drain after."""

    offered_rate: float
    sent: SentOrders
    terminal_at: dict[str, float]  # accepted order id -> when its OrderStatusChanged was seen
    backlog: list[tuple[float, Backlog]]  # seconds since the first send, while sending
    drain_seconds: float | None  # from the last send until the backlog was 0; None: not in time

    @property
    def latencies_ms(self) -> list[float]:
        accepted = self.sent.accepted
        return [(at - accepted[i][0]) * 1000 for i, at in self.terminal_at.items()]

    def percentile_ms(self, cut: str) -> float | None:
        latencies = self.latencies_ms
        return percentiles(latencies)[cut] if len(latencies) >= 2 else None

    @property
    def unfinished(self) -> int:
        return len(self.sent.accepted) - len(self.terminal_at)

    @property
    def backlog_growth(self) -> float:
        return growth_per_second([(t, b.total) for t, b in self.backlog])

    @property
    def goodput(self) -> float:
        """Accepted orders seen terminal while sending, per second of sending."""
        span = self.sent.last_sent - self.sent.first_sent
        done = sum(1 for at in self.terminal_at.values() if at <= self.sent.last_sent)
        return done / max(span, 1e-9)

    def shortfalls(self) -> list[str]:
        """Why the pipeline did not sustain the offered rate; empty when it did."""
        reasons = []
        if self.sent.sent_per_second < SENDER_SHORTFALL * self.offered_rate:
            reasons.append(f"sender reached {self.sent.sent_per_second:.0f}/s")
        if refused := sum(self.sent.refused.values()) + self.sent.unanswered:
            reasons.append(f"{refused} calls not accepted")
        if self.unfinished:
            reasons.append(f"{self.unfinished} orders not terminal")
        p99 = self.percentile_ms("p99")
        if p99 is None or p99 >= P99_BOUND_MS:
            reasons.append("p99 n/a" if p99 is None else f"p99 {p99:.0f} ms")
        if not is_flat([(t, b.total) for t, b in self.backlog], self.offered_rate):
            reasons.append(f"backlog grew {self.backlog_growth:.1f}/s")
        return reasons


class PipelineStuck(RuntimeError):
    """The backlog did not drain within the bound: later windows would measure the leftover."""


class Pipeline:
    """Sends windows of orders to a started Stack, watching its orders topic."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.watcher = start_watcher(stack.kafka)
        self.user_ids = create_users(stack.address("user_service"), USERS)
        self._channel = admin_channel(stack.address("order_service"))
        self._orders = orders_pb2_grpc.OrderServiceStub(self._channel)
        self.backlog = BacklogProbe(stack.database_url)

    def close(self) -> None:
        self.watcher.stop.set()
        self._channel.close()
        self.backlog.close()

    def wait_until_drained(self, bound: float) -> None:
        if self._seconds_until_empty(time.monotonic(), bound) is None:
            raise PipelineStuck(f"backlog {self.backlog.read()} still there after {bound:.0f} s")

    def window(
        self, rate: float, seconds: float, drain_bound: float, sample_every: float = 1.0
    ) -> Window:
        """`rate` orders per second for `seconds`, from an empty backlog; then waits up to
        `drain_bound` seconds for every accepted order to be terminal."""
        self.wait_until_drained(drain_bound)
        samples: list[tuple[float, Backlog]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(samples, stop, sample_every))
        sampler.start()
        try:
            sent = send_at_rate(self._orders, self.user_ids, max(2, round(rate * seconds)), rate)
        finally:
            stop.set()
            sampler.join()
        drain = self._seconds_until_empty(sent.last_sent, drain_bound)
        terminal_at = self._terminal_times(sent, wait=5.0 if drain is not None else 0.5)
        during = [(t - sent.first_sent, b) for t, b in samples if t <= sent.last_sent]
        return Window(rate, sent, terminal_at, during, drain)

    def _sample(
        self, samples: list[tuple[float, Backlog]], stop: threading.Event, every: float
    ) -> None:
        while not stop.wait(every):
            samples.append((time.monotonic(), self.backlog.read()))

    def _seconds_until_empty(self, since: float, bound: float) -> float | None:
        while time.monotonic() < since + bound:
            if self.backlog.read().total == 0:
                return time.monotonic() - since
            time.sleep(0.2)
        return None

    def _terminal_times(self, sent: SentOrders, wait: float) -> dict[str, float]:
        """When the watcher saw each accepted order's OrderStatusChanged (it lags the database
        by the relay's and Kafka's hop: waits up to `wait` seconds for it to catch up)."""
        seen = self.watcher.seen
        deadline = time.monotonic() + wait
        while any(i not in seen for i in sent.accepted) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {i: seen[i][0] for i in list(sent.accepted) if i in seen}


# The sweep: bracket, then bisect, on the share of the CreateOrder-only rate measured just
# before each probe (A/B pairs alternated), so that the machine's drift between probes cancels.


@dataclass(frozen=True)
class Probe:
    share: float  # of `create_only_rate`
    create_only_rate: float  # CreateOrder alone (no relay, no processor), just before
    window: Window
    long: bool  # a final window, at least as long as asked for the result

    @property
    def sustained(self) -> bool:
        return not self.window.shortfalls()


def next_share(outcomes: Sequence[tuple[float, bool]], start: float, floor: float) -> float | None:
    """The share to probe next, from the (share, sustained) outcomes so far: halve until one
    holds, double until one fails (at most 1), then the geometric middle of the bracket. None
    when the bracket is narrower than 10 % or the share would fall below `floor`."""
    held, failed = best_held(outcomes), _lowest_failed(outcomes)
    if held is None and failed is None:
        return start
    if held is None:
        return failed / 2 if failed is not None and failed / 2 >= floor else None
    if failed is None:
        return min(1.0, held * 2) if held < 1.0 else None
    return math.sqrt(held * failed) if failed / held > 1.1 else None


def _lowest_failed(outcomes: Sequence[tuple[float, bool]]) -> float | None:
    return min((share for share, held in outcomes if not held), default=None)


def best_held(outcomes: Sequence[tuple[float, bool]]) -> float | None:
    """The highest share that held below the lowest that failed (a failure outranks a pass at
    a higher share: it is the noise that a sweep must not be fooled by)."""
    failed = _lowest_failed(outcomes)
    return max(
        (share for share, held in outcomes if held and (failed is None or share < failed)),
        default=None,
    )


@dataclass(frozen=True)
class SweepPlan:
    start: float  # first share probed
    floor: float  # lowest share worth probing
    probes: int  # short windows, at most
    probe_seconds: float
    confirmations: int  # long windows, at most
    final_seconds: float
    drain_bound: float


@dataclass(frozen=True)
class Sweep:
    probes: list[Probe]

    @property
    def result(self) -> Probe | None:
        """The highest share that held over a long window (and below any that failed)."""
        best = best_held([(p.share, p.sustained) for p in self.probes])
        held_long = [p for p in self.probes if p.long and p.sustained and p.share == best]
        return held_long[-1] if held_long else None


def sweep(pipeline: Pipeline, create_only_rate: Callable[[], float], plan: SweepPlan) -> Sweep:
    probes: list[Probe] = []

    def probe(share: float, seconds: float, long: bool) -> Probe:
        reference = create_only_rate()
        window = pipeline.window(share * reference, seconds, plan.drain_bound)
        probes.append(Probe(share, reference, window, long))
        return probes[-1]

    def outcomes() -> list[tuple[float, bool]]:
        return [(p.share, p.sustained) for p in probes]

    short_done = long_done = 0
    # Short probes narrow the bracket; the best share is then confirmed by a long window. If
    # that fails, the short probes go on below it, as long as both budgets last.
    while long_done < plan.confirmations:
        share = next_share(outcomes(), plan.start, plan.floor) if short_done < plan.probes else None
        if share is not None:
            short_done += 1
            probe(share, plan.probe_seconds, long=False)
            continue
        best = best_held(outcomes())
        if best is None:
            break
        long_done += 1
        if probe(best, plan.final_seconds, long=True).sustained:
            break
    return Sweep(probes)
