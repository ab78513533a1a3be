"""The figures `make bench` stands on, each a ratio or a count from one run, beside its target."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bench.costs import HealthCheckCost, WindowCosts
from bench.counters import is_request_path_write, mentions_notify
from bench.pipeline import BacklogProbe, Probe, Window, is_flat
from bench.tracing_cost import EXPORTED, RECORDED, TracingRounds
from bench.watchers import WatcherRounds

MAX_COST_RATIO = 7.0
MIN_SUSTAINED_SHARE = 0.6
MIN_OVERLOAD_GOODPUT = 0.9
OVERLOAD_P99_BOUND_MS = 1000.0
DRAIN_BOUND_SECONDS = 5.0
MIN_CREATE_ORDER_SHARE = 0.6
MIN_GET_ORDER_SHARE = 0.7
MAX_PEAK_RSS_MB = 150.0
SETTLE_METHODS = ("/BatchUpdateOrderStatus", "/UpdateOrderStatus")


@dataclass(frozen=True)
class Figure:
    name: str
    measured: str
    target: str
    met: bool | None  # None: reported without a target, or not measurable (measured says why)


def _number(figure: Figure) -> int:
    """The figure's number: 5 for "5. …" and for "5b. …"."""
    match = re.match(r"\d+", figure.name)
    return int(match[0]) if match else 0


def table(figures: Sequence[Figure]) -> list[str]:
    """In the order of their numbers (the name's first word), whatever order they were taken."""
    marks = {True: "yes", False: "**no**", None: "-"}
    ordered = sorted(figures, key=_number)
    return [
        "| figure | measured | target | met? |",
        "|---|---|---|---|",
        *(f"| {f.name} | {f.measured} | {f.target} | {marks[f.met]} |" for f in ordered),
    ]


def cost_ratio(costs: WindowCosts, health: HealthCheckCost, not_measured: list[str]) -> Figure:
    name = "1. stack CPU per processed order ÷ order_service CPU per Health/Check"
    target = f"≤ {MAX_COST_RATIO:g}"
    if not costs.orders or not health.calls:
        return Figure(name, "n/a: no order or no Health/Check completed", target, None)
    ratio = costs.cpu_per_order / health.cpu_per_call
    busy_call = health.busy_cpu_per_call(costs.idle_cpu.get("order_service", 0.0))
    busy = f"{costs.busy_cpu_per_order / busy_call:.1f}" if busy_call else "n/a"
    without = f"; {', '.join(not_measured)} not measured" if not_measured else ""
    measured = (
        f"{ratio:.1f} ({costs.cpu_per_order * 1e3:.2f} ms ÷ {health.cpu_per_call * 1e6:.0f} µs,"
        f" both at {costs.window.offered_rate:.0f}/s; less idle CPU: {busy}{without})"
    )
    return Figure(name, measured, target, ratio <= MAX_COST_RATIO)


def batch_size(costs: WindowCosts) -> tuple[float | None, str]:
    """B, orders settled per status callback, and how it was counted."""
    batch, single = (
        sum(n for method, n in costs.rpc_calls.items() if method.endswith(suffix))
        for suffix in SETTLE_METHODS
    )
    if not batch + single:
        return None, "no status callback in the access log"
    how = f"{batch} BatchUpdateOrderStatus + {single} UpdateOrderStatus calls"
    if not batch:
        how += "; no BatchUpdateOrderStatus: one callback per order"
    return costs.orders / (batch + single), how


def structural(costs: WindowCosts, tracks_nested: bool) -> list[Figure]:
    orders = max(costs.orders, 1)
    b, how = batch_size(costs)
    bound = 1 + 1 / b if b else None
    target = f"≤ 1 + 1/B = {bound:.2f}" if bound else "≤ 1 + 1/B"
    rpcs = sum(costs.rpc_calls.values()) / orders
    figures = [
        Figure(
            "2. B, orders per status callback",
            f"{b:.1f} ({how})" if b else f"n/a: {how}",
            "-",
            None,
        ),
        Figure("2. gRPC calls per order", f"{rpcs:.2f}", target, rpcs <= bound if bound else None),
        *_statement_figures(costs, orders, target, bound, tracks_nested),
        Figure(
            "2. xact_commit per order (raw, relay's too)",
            f"{costs.commits / orders:.2f}",
            "-",
            None,
        ),
        Figure(
            "2. Kafka records per order (events + transaction markers)",
            f"{costs.kafka_records / orders:.2f}",
            "-",
            None,
        ),
    ]
    return figures


def _statement_figures(
    costs: WindowCosts, orders: int, target: str, bound: float | None, tracks_nested: bool
) -> list[Figure]:
    flushing, notify = "2. WAL-flushing commits per order", "2. NOTIFY per order"
    if costs.statements is None:
        why = "n/a: no pg_stat_statements (see the statements section)"
        return [Figure(flushing, why, target, None), Figure(notify, why, "0", None)]
    writes = sum(s.calls for s in costs.statements if is_request_path_write(s.query, s.toplevel))
    notifies = sum(s.calls for s in costs.statements if mentions_notify(s.query))
    per_order = writes / orders
    untracked = "" if tracks_nested else " (pg_stat_statements.track is not all: triggers unseen)"
    return [
        Figure(flushing, f"{per_order:.2f}", target, per_order <= bound if bound else None),
        Figure(notify, f"{notifies / orders:.2f}{untracked}", "0", notifies == 0),
    ]


def sustained(result: Probe | None, probes: Sequence[Probe], stand_in: float = 0.0) -> Figure:
    name = "3. max sustainable e2e rate ÷ CreateOrder-only max"
    target = f"≥ {MIN_SUSTAINED_SHARE:g}"
    if result is None:
        lowest = min(p.share for p in probes)
        why = (
            f"n/a: no share held over a long window (lowest tried {lowest:.3f});"
            f" figures 4, 5 and 7 take {stand_in:.0f}/s as the sustainable rate"
        )
        return Figure(name, why, target, None)
    measured = (
        f"{result.share:.2f} ({result.share * result.create_only_rate:.0f} orders/s;"
        f" CreateOrder alone {result.create_only_rate:.0f}/s just before)"
    )
    return Figure(name, measured, target, result.share >= MIN_SUSTAINED_SHARE)


def half_rate_latency(window: Window) -> Figure:
    p99 = window.percentile_ms("p99")
    name = "4. e2e p99 at half the max sustainable rate"
    measured = f"{p99:.1f} ms at {window.offered_rate:.0f}/s" if p99 is not None else "n/a"
    return Figure(name, measured, "< 50 ms", p99 < 50 if p99 is not None else None)


def overload(
    window: Window, sustainable: float, probe: BacklogProbe, label: str = "5. overload"
) -> list[Figure]:
    shed = window.sent.refused.get("RESOURCE_EXHAUSTED", 0)
    others = {code: n for code, n in window.sent.refused.items() if code != "RESOURCE_EXHAUSTED"}
    p99 = window.percentile_ms("p99")
    lost = probe.still_created(window.sent.accepted)
    drain = window.drain_seconds
    share = window.goodput / sustainable
    retry = window.sent.refused_with_retry_info
    return [
        Figure(
            f"{label}: goodput ÷ sustainable",
            f"{share:.2f} ({window.goodput:.0f}/s at {window.offered_rate:.0f}/s offered)",
            f"≥ {MIN_OVERLOAD_GOODPUT:g}",
            share >= MIN_OVERLOAD_GOODPUT,
        ),
        Figure(
            f"{label}: p99 of accepted orders",
            f"{p99:.0f} ms" if p99 is not None else "n/a",
            "< 1 s",
            p99 < OVERLOAD_P99_BOUND_MS if p99 is not None else None,
        ),
        Figure(
            f"{label}: shed (RESOURCE_EXHAUSTED), with RetryInfo",
            f"{shed}, {retry} with RetryInfo" + (f"; other refusals {others}" if others else ""),
            "each with RetryInfo",
            retry == shed if shed else None,
        ),
        Figure(f"{label}: acknowledged orders lost", str(lost), "0", lost == 0),
        Figure(
            f"{label}: backlog back to 0 after the load",
            f"{drain:.1f} s" if drain is not None else "not within the bound",
            f"≤ {DRAIN_BOUND_SECONDS:g} s",
            drain is not None and drain <= DRAIN_BOUND_SECONDS,
        ),
    ]


def additive_ceiling(concurrency: int, rates: dict[str, float], pgbench_tps: float) -> list[Figure]:
    """CreateOrder against 1/(1/R + 1/D): the RPC's cost and its statement's, added."""
    ceiling = 1 / (1 / rates["Health/Check"] + 1 / pgbench_tps)
    create, get = rates["CreateOrder"] / ceiling, rates["GetOrder"] / rates["Health/Check"]
    return [
        Figure(
            f"6. CreateOrder ÷ 1/(1/R + 1/D), c={concurrency}",
            f"{create:.2f} ({rates['CreateOrder']:.0f}/s; R {rates['Health/Check']:.0f},"
            f" D {pgbench_tps:.0f})",
            f"≥ {MIN_CREATE_ORDER_SHARE:g}",
            create >= MIN_CREATE_ORDER_SHARE,
        ),
        Figure(
            f"6. GetOrder ÷ R, c={concurrency}",
            f"{get:.2f} ({rates['GetOrder']:.0f}/s)",
            f"≥ {MIN_GET_ORDER_SHARE:g}",
            get >= MIN_GET_ORDER_SHARE,
        ),
    ]


def soak(window: Window, samples: Sequence[tuple[float, int]]) -> Figure:
    rows = ", ".join(f"{rows}" for _, rows in samples)
    flat = is_flat(samples, window.offered_rate)
    return Figure(
        f"7. outbox rows over {window.sent.last_sent - window.sent.first_sent:.0f} s"
        f" at {window.offered_rate:.0f}/s",
        f"{rows} (every {_spacing(samples):.0f} s)",
        "flat",
        flat,
    )


def _spacing(samples: Sequence[tuple[float, int]]) -> float:
    return (samples[-1][0] - samples[0][0]) / (len(samples) - 1) if len(samples) > 1 else 0.0


def peak_rss(by_process: dict[str, float]) -> Figure:
    measured = ", ".join(f"{name} {mb:.0f}" for name, mb in by_process.items())
    return Figure(
        "8. peak RSS (VmHWM) per process, MB",
        measured,
        f"< {MAX_PEAK_RSS_MB:g} each",
        all(mb < MAX_PEAK_RSS_MB for mb in by_process.values()),
    )


def tls_cost(ratios: dict[str, float]) -> Figure:
    """RPC/s over mutual TLS ÷ RPC/s in plaintext, per RPC (bench.run.run_tls_cost)."""
    measured = ", ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items())
    return Figure("9. RPC/s with mutual TLS ÷ plaintext", measured, "reported", None)


def tracing_cost(rounds: TracingRounds, spans_exported: int) -> Figure:
    """CreateOrder RPC/s with tracing ÷ without, medians of same-round ratios."""
    measured = (
        f"exported (OTLP) {rounds.median_ratio(EXPORTED):.2f},"
        f" recorded, not exported (the default) {rounds.median_ratio(RECORDED):.2f}"
        f" ({spans_exported} spans exported)"
    )
    return Figure(
        "10. CreateOrder RPC/s with tracing ÷ OTEL_SDK_DISABLED", measured, "reported", None
    )


def watch_cost(rounds: WatcherRounds, watchers: int, memory_mb: float) -> Figure:
    """GetOrder with the watchers open ÷ without, medians of same-round ratios."""
    rps, p99 = rounds.median_ratio("rps"), rounds.median_ratio("p99_ms")
    return Figure(
        f"11. GetOrder with {watchers:,} open WatchOrder streams on the process ÷ without",
        f"RPC/s {rps:.2f}, p99 {p99:.2f}; the streams hold {memory_mb:.0f} MB",
        "RPC/s ≥ 0.9, p99 ≤ 1.2",
        rps >= 0.9 and p99 <= 1.2,
    )
