"""What every process exposes on its `/metrics` port (Prometheus text format), one place for the
names. Alert rules on them: infra/prometheus/alerts.yml."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPCS = Counter(
    "ecommerce_rpc_handled", "RPCs handled, by method and status code", ["method", "code"]
)
RPC_SECONDS = Histogram(
    "ecommerce_rpc_duration_seconds",
    "Time from a call's arrival to its status, by method",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SHED_CALLS = Counter(
    "ecommerce_shed_calls", "Calls shed (RESOURCE_EXHAUSTED), by reason", ["reason"]
)
DB_CONNECTIONS_IN_USE = Gauge(
    "ecommerce_db_pool_connections_in_use", "Database connections checked out of the pool"
)
EVENTS_PUBLISHED = Counter(
    "ecommerce_outbox_events_published", "Events the broker acknowledged, by source", ["source"]
)
PUBLISH_FAILURES = Counter(
    "ecommerce_outbox_publish_failures",
    "Relay cycles interrupted (the events stay and are retried), by source",
    ["source"],
)
OUTBOX_OLDEST_AGE = Gauge(
    "ecommerce_outbox_oldest_unpublished_age_seconds",
    "Age of the oldest event not yet published (0: none waits), by source",
    ["source"],
)
PROCESSOR_OUTCOMES = Counter(
    "ecommerce_processor_outcomes",
    "Messages the processor handled, by result (processed, failed, dead_lettered, retry_later)",
    ["result"],
)
CONSUMER_LAG = Gauge(
    "ecommerce_processor_consumer_lag",
    "Messages of a partition not read yet by this consumer (end offset - position)",
    ["topic", "partition"],
)
CONSUMER_REBALANCES = Counter(
    "ecommerce_processor_rebalances",
    "Partition assignment changes of the processor's consumer, by event (assigned, revoked, lost:"
    " evicted from the group, e.g. for polling later than max.poll.interval.ms)",
    ["event"],
)
DEAD_LETTERS = Counter("ecommerce_processor_dead_letters", "Messages sent to the DLQ", ["reason"])


class MetricsEndpoint:
    """/metrics over HTTP on host:port (0: any free port), served by a thread of its own."""

    def __init__(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host)
        self.port = int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
