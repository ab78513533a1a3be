"""The tables of bench/RESULTS.md: the figures first, then the measurements they come from."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from bench.costs import HealthCheckCost, WindowCosts
from bench.counters import is_request_path_write, mentions_notify
from bench.figures import Figure, table
from bench.ghz import RpcFigures
from bench.pipeline import Probe, Window
from bench.tracing_cost import OFF, TracingRounds
from bench.watchers import WatcherRounds

TLS_HEADER = [
    "Mutual TLS against plaintext (GRPC_INSECURE=true), closed loop (ghz), same order_service"
    " code and database, one after the other:",
    "",
    "| RPC | concurrency | RPC/s TLS | RPC/s plaintext | TLS ÷ plaintext | p50 ms TLS"
    " | p50 ms plaintext | p99 ms TLS | p99 ms plaintext |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def tls_row(name: str, concurrency: int, tls: RpcFigures, clear: RpcFigures) -> str:
    return (
        f"| {name} | {concurrency} | {tls.rps:.0f} | {clear.rps:.0f} | {tls.rps / clear.rps:.2f}"
        f" | {tls.p50_ms:.1f} | {clear.p50_ms:.1f} | {tls.p99_ms:.1f} | {clear.p99_ms:.1f} |"
    )


def tracing_rows(rounds: TracingRounds, concurrency: int, spans_exported: int) -> list[str]:
    """CreateOrder per tracing variant, round by round (bench.tracing_cost)."""
    lines = [
        f"Tracing (OpenTelemetry) on and off, CreateOrder closed loop (ghz) at c={concurrency},"
        " three order_service twins on one database, the variants alternated in each round;"
        f" exported: OTLP/gRPC to a sink in the bench process ({spans_exported} spans received):",
        "",
        "| round | variant | RPC/s | ÷ off, same round | p50 ms | p99 ms |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    off = rounds.by_variant[OFF]
    for variant, measured in rounds.by_variant.items():
        for number, (figures, reference) in enumerate(zip(measured, off, strict=True), 1):
            lines.append(
                f"| {number} | {variant} | {figures.rps:.0f} | {figures.rps / reference.rps:.2f}"
                f" | {figures.p50_ms:.1f} | {figures.p99_ms:.1f} |"
            )
    return lines


def watcher_rows(
    rounds: WatcherRounds, concurrency: int, watchers: int, memory_mb: list[float]
) -> list[str]:
    """GetOrder without and with the watchers open, round by round (bench.watchers)."""
    lines = [
        f"GetOrder closed loop (ghz) at c={concurrency} on the CreateOrder-only stack's"
        f" order_service, without and then with {watchers:,} WatchOrder streams open on it"
        f" ({-(-watchers // 100)} connections, orders that stay CREATED), alternated:",
        "",
        "| round | RPC/s without | RPC/s with | ÷ | p99 ms without | p99 ms with | RSS added, MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pairs = zip(rounds.without, rounds.with_watchers, memory_mb, strict=True)
    for number, (off, on, added) in enumerate(pairs, 1):
        lines.append(
            f"| {number} | {off.rps:.0f} | {on.rps:.0f} | {on.rps / off.rps:.2f}"
            f" | {off.p99_ms:.1f} | {on.p99_ms:.1f} | {added:.0f} |"
        )
    return lines


RPC_HEADER = [
    "Closed loop (ghz), on the CreateOrder-only stack (no relay, no processor):",
    "",
    "| RPC | concurrency | RPC/s | p50 ms | p99 ms | not OK (incl. cut off at the end)"
    " | RPC/s ÷ RPC ceiling |",
    "|---|---:|---:|---:|---:|---:|---:|",
]
DATA_ACCESS_INTRO = ["Data access on the request path (`python -m bench.data_access`):", ""]


def document(
    figures: Sequence[Figure],
    sections: Sequence[list[str]],
    durations: dict[str, float],
    started: datetime,
    machine: str,
) -> str:
    timing = ["| part | seconds |", "|---|---:|"]
    timing += [f"| {part} | {seconds:.0f} |" for part, seconds in durations.items()]
    blocks = [
        "# Benchmarks",
        f"`make bench` on {started:%Y-%m-%d %H:%M} UTC, {machine}; the load generators (ghz,"
        " and bench's own open-loop sender for the pipeline) run on the same machine. Every"
        " figure is a ratio or a count within this one run.",
        "\n".join(table(figures)),
        *("\n".join(section) for section in sections),
        "\n".join(timing),
    ]
    return "\n\n".join(blocks) + "\n"


def ceiling_rows(
    rates: dict[int, dict[str, float]], pgbench_tps: dict[int, float], producer: float
) -> list[str]:
    rows = [
        "| ceiling | concurrency | per second | CreateOrder ÷ ceiling"
        " | CreateOrder ÷ 1/(1/R + 1/D) |",
        "|---|---:|---:|---:|---:|",
    ]
    for concurrency, tps in pgbench_tps.items():
        create, health = rates[concurrency]["CreateOrder"], rates[concurrency]["Health/Check"]
        additive = 1 / (1 / health + 1 / tps)
        rows.append(
            f"| pgbench, CreateOrder's SQL (D) | {concurrency} | {tps:.0f} | {create / tps:.2f}"
            f" | {create / additive:.2f} |"
        )
    rows.append(f"| Kafka ProducerPerformance, 300 B, acks=all | - | {producer:.0f} | - | - |")
    return rows


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "n/a"


def sweep_rows(probes: Sequence[Probe]) -> list[str]:
    rows = [
        "Sweep for the max sustainable rate (open loop, orders of 32 users): each probe offers a"
        " share of CreateOrder's closed-loop rate measured on the CreateOrder-only stack just"
        " before it; held = flat backlog, every order terminal, nothing refused,"
        " create -> OrderStatusChanged seen p99 < 50 ms.",
        "",
        "| share | CreateOrder alone /s | offered /s | sent /s | terminal /s | p50 ms | p99 ms"
        " | backlog growth /s | window s | held? |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for probe in probes:
        w = probe.window
        shortfalls = w.shortfalls()
        held = "yes" if not shortfalls else "no: " + "; ".join(shortfalls)
        rows.append(
            f"| {probe.share:.3f} | {probe.create_only_rate:.0f} | {w.offered_rate:.0f}"
            f" | {w.sent.sent_per_second:.0f} | {w.goodput:.0f} | {_ms(w.percentile_ms('p50'))}"
            f" | {_ms(w.percentile_ms('p99'))} | {w.backlog_growth:.1f}"
            f" | {_span(w):.0f}{' (long)' if probe.long else ''} | {held} |"
        )
    return rows


def _span(window: Window) -> float:
    return window.sent.last_sent - window.sent.first_sent


def window_rows(label: str, windows: Sequence[Window]) -> list[str]:
    rows = [
        f"The {label} window:",
        "",
        "| offered /s | sent /s | accepted | refused | terminal /s while sending | p50 ms"
        " | p99 ms | max ms | backlog 0 after (s) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for w in windows:
        refused = ", ".join(f"{code} {n}" for code, n in w.sent.refused.items()) or "0"
        drain = f"{w.drain_seconds:.1f}" if w.drain_seconds is not None else "not in time"
        rows.append(
            f"| {w.offered_rate:.0f} | {w.sent.sent_per_second:.0f} | {len(w.sent.accepted)}"
            f" | {refused} | {w.goodput:.0f} | {_ms(w.percentile_ms('p50'))}"
            f" | {_ms(w.percentile_ms('p99'))} | {_ms(w.percentile_ms('max'))} | {drain} |"
        )
    return rows


def cost_rows(costs: WindowCosts, health: HealthCheckCost) -> list[str]:
    orders = max(costs.orders, 1)
    rows = [
        f"Cost of {costs.orders} orders sent at {costs.window.offered_rate:.0f}/s for"
        f" {_span(costs.window):.0f} s, until processed (CPU from /proc; PostgreSQL: the"
        " pipeline database's backends, the server's own processes, and children reaped"
        " meanwhile, of any database; idle: just before, with no load):",
        "",
        "| process | CPU ms per order | of which reaped children | idle CPU ms per second |",
        "|---|---:|---:|---:|",
    ]
    for name, spent in costs.cpu.items():
        per_order, reaped = (1e3 * ms / orders for ms in (spent.seconds, spent.reaped_seconds))
        idle = 1e3 * costs.idle_cpu.get(name, 0.0)
        rows.append(f"| {name} | {per_order:.3f} | {reaped:.3f} | {idle:.1f} |")
    idle_total = 1e3 * sum(costs.idle_cpu.values())
    rows.append(f"| all | {costs.cpu_per_order * 1e3:.3f} | | {idle_total:.1f} |")
    by_method = ", ".join(
        f"{method.rsplit('/', 1)[-1]} {n / orders:.2f}"
        for method, n in costs.rpc_calls.most_common()
    )
    rows += [
        "",
        f"RPCs per order: {by_method or 'none logged'}. order_service per Health/Check:"
        f" {health.cpu_per_call * 1e6:.0f} µs ({health.calls} calls, open loop at"
        f" {health.rate:.0f}/s). Per order, pipeline database: {costs.commits / orders:.2f}"
        f" commits, {costs.sessions / orders:.3f} connections opened (each commits once)"
        f"{_commits_unseen(costs, orders)}.",
    ]
    return rows


def _commits_unseen(costs: WindowCosts, orders: int) -> str:
    if costs.statements is None:
        return ""
    top_level = sum(s.calls for s in costs.statements if s.toplevel)
    unseen = (costs.commits - top_level - costs.sessions) / orders
    return (
        f"; {unseen:.2f} beyond top-level statements and connections (a LISTENing backend"
        " commits a transaction for each notification it reads)"
    )


def statement_rows(costs: WindowCosts, missing: str | None) -> list[str]:
    if costs.statements is None:
        return [f"Statements per order: n/a, {missing}."]
    orders = max(costs.orders, 1)
    top_level = sum(s.calls for s in costs.statements if s.toplevel) / orders
    rows = [
        f"Statements per order (pg_stat_statements, the pipeline database): {top_level:.2f} at"
        " top level in all; those of 0.01 per order or more:",
        "",
        "| statement | top level | calls per order | counted as |",
        "|---|---|---:|---|",
    ]
    for s in sorted(costs.statements, key=lambda s: -s.calls):
        if s.calls / orders < 0.01:
            continue
        counted = "WAL-flushing commit" if is_request_path_write(s.query, s.toplevel) else "-"
        counted = "NOTIFY" if mentions_notify(s.query) else counted
        query = " ".join(s.query.split())[:100].replace("|", "\\|")
        rows.append(
            f"| `{query}` | {'yes' if s.toplevel else 'no'} | {s.calls / orders:.2f} | {counted} |"
        )
    return rows
