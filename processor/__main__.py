"""`python -m processor`: consume order events until SIGTERM/SIGINT, then commit and exit 0."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures

from confluent_kafka import Consumer
from ecommerce.v1 import orders_pb2_grpc

from processor.consumer import (
    DeadLetterQueue,
    OrderEventProcessor,
    consumer_config,
)
from processor.rules import CurrencyAndLimitRule
from processor.settings import ProcessorSettings
from servicekit.jsonlog import configure_logging
from servicekit.metrics import MetricsEndpoint
from servicekit.server import Endpoint, GrpcServer, HealthWatch, install_stop_signals
from servicekit.settings import SettingsError
from servicekit.tls import open_channel
from servicekit.tracing import start_tracing

log = logging.getLogger("processor")
HEALTH_SERVICE_NAME = "ecommerce.processor"


def consumer_health(
    last_progress: Callable[[], float], stall_seconds: float
) -> Callable[[], dict[str, bool]]:
    """SERVING while the consumer loop comes round (it does at least every poll timeout, idle or
    not); NOT_SERVING once it has not for `stall_seconds`: stuck in a callback that does not
    succeed, or hung."""
    return lambda: {"": time.monotonic() - last_progress() < stall_seconds}


def load_settings(env: Mapping[str, str] | None = None) -> ProcessorSettings:
    return ProcessorSettings.from_env(env)


def open_processor(
    settings: ProcessorSettings, stop: threading.Event
) -> tuple[OrderEventProcessor, Callable[[], None]]:
    """The consume loop and its clients (Kafka, the DLQ, the callback channel), made in the
    process that uses them; the callable closes the clients once the loop has returned."""
    consumer = Consumer(
        consumer_config(
            settings.kafka,
            settings.group_id,
            **{"max.poll.interval.ms": settings.max_poll_interval_ms},
        )
    )
    dead_letters = DeadLetterQueue(settings.kafka, settings.group_id)
    channel = open_channel(
        settings.order_service_address, settings.tls, server_identity="order_service"
    )
    processor = OrderEventProcessor(
        consumer,
        orders_pb2_grpc.OrderServiceStub(channel),
        CurrencyAndLimitRule(settings.accepted_currencies, settings.max_order_amount),
        dead_letters,
        callback_timeout=settings.callback_timeout_seconds,
        callback_retry_seconds=settings.callback_retry_seconds,
        stop=stop,
        batch_size=settings.batch_size,
        batch_linger_seconds=settings.batch_linger_seconds,
    )
    processor.subscribe(settings.kafka.orders_topic)

    def close() -> None:
        consumer.close()  # commits nothing more: run() committed what was applied
        dead_letters.close()
        channel.close()

    return processor, close


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as error:
        sys.exit(f"configuration error: {error}")
    configure_logging("processor", settings.log_level)
    start_tracing("processor", settings.tracing)
    stop = install_stop_signals()

    # Every client is made here, in the process that uses it (none survives a fork).
    health = GrpcServer(
        Endpoint(
            name=HEALTH_SERVICE_NAME,
            host=settings.listen_host,
            port=settings.health_port,
            tls=settings.tls,
            reflection=settings.reflection_enabled,
        ),
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
    )
    processor, close_clients = open_processor(settings, stop)
    watch = HealthWatch(
        consumer_health(lambda: processor.last_progress, settings.stall_seconds),
        health.report,
        interval=min(1.0, settings.stall_seconds / 4),
    )
    watch.start()
    metrics = MetricsEndpoint(settings.metrics_host, settings.metrics_port)
    log.info(
        "serving",
        extra={
            "fields": {
                "port": health.port,
                "metrics_port": metrics.port,
                "topic": settings.kafka.orders_topic,
            }
        },
    )
    try:
        processor.run()
    finally:
        watch.stop()
        health.report("", False)
        close_clients()
        health.stop(grace_seconds=1)
        metrics.stop()
    log.info("stopped", extra={"fields": {"handled": processor.handled}})


if __name__ == "__main__":
    main()
