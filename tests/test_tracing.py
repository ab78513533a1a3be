"""Traces end to end on the real parts: one trace from CreateOrder through the outbox, Kafka and
the processor to the status callback, and its trace id on the processor's log line."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator, Sequence

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2
from google.type.money_pb2 import Money
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind
from sqlalchemy import Engine

from processor.__main__ import open_processor
from processor.settings import ProcessorSettings
from servicekit.jsonlog import JsonFormatter
from servicekit.server import RunningService
from servicekit.settings import SettingsError
from servicekit.tracing import TRACER, TracingSettings, start_tracing
from tests.conftest import KAFKA, PROCESSOR_GROUP, RelayHandle
from tests.test_eventing import money, processor_env, wait_until_terminal
from testsupport.processes import ServiceProcess, wait_until

CREATE_ORDER = "ecommerce.v1.OrderService/CreateOrder"
BATCH_UPDATE = "ecommerce.v1.OrderService/BatchUpdateOrderStatus"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this test process makes from now on (servers, relay, in-process processor)."""
    exporter = InMemorySpanExporter()
    start_tracing("tests", TracingSettings.from_env({}), SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # later tests' spans are dropped, not kept in memory


@pytest.fixture
def in_process_processor(
    order_server: RunningService, relay: RelayHandle, spans: InMemorySpanExporter
) -> Iterator[None]:
    """The processor's consume loop in a thread of this process, so its spans are seen here."""
    stop = threading.Event()
    processor, close = open_processor(ProcessorSettings.from_env(processor_env(order_server)), stop)
    loop = threading.Thread(target=processor.run, name="processor", daemon=True)
    loop.start()
    yield
    stop.set()
    loop.join(30)
    close()


def in_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [
        span
        for span in exporter.get_finished_spans()
        if span.context is not None and span.context.trace_id == trace_id
    ]


def child(spans: Sequence[ReadableSpan], parent: ReadableSpan, kind: SpanKind) -> ReadableSpan:
    """The one span of `kind` whose parent is `parent`."""
    assert parent.context is not None
    (found,) = [
        span
        for span in spans
        if span.kind == kind and span.parent and span.parent.span_id == parent.context.span_id
    ]
    return found


def processor_caught_up() -> bool:
    """Whether nothing is left to read after the processor group's committed offsets (transaction
    markers follow the last message, so offsets alone cannot tell)."""
    reader = Consumer(
        KAFKA.client_config(
            **{
                "group.id": PROCESSOR_GROUP,  # only to read its offsets: it never joins
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
    )
    try:
        topic = KAFKA.orders_topic
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        committed = reader.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        reader.assign([TopicPartition(topic, tp.partition, max(tp.offset, 0)) for tp in committed])
        at_end: set[int | None] = set()
        while len(at_end) < len(partitions):
            message = reader.poll(10)
            if message is None:
                return False
            error = message.error()
            if error is None:
                return False  # a message the processor has not committed yet
            if error.code() == KafkaError._PARTITION_EOF:
                at_end.add(message.partition())
        return True
    finally:
        reader.close()


def place_traced_order(
    orders: orders_pb2_grpc.OrderServiceStub, user_id: str, amount: Money, engine: Engine
) -> tuple[orders_pb2.Order, SpanContext]:
    """An order placed inside a span of the test's own, once settled; and that span's context."""
    # The order must be the first of its consumer batch (whose callback span continues the first
    # event's trace and links the others): nothing from earlier tests may be waiting.
    assert wait_until(processor_caught_up, timeout=60)
    with TRACER.start_as_current_span("place an order") as root:
        order = orders.CreateOrder(orders_pb2.CreateOrderRequest(user_id=user_id, amount=amount))
    wait_until_terminal(engine, [order.id])
    return order, root.get_span_context()


def test_one_trace_from_create_order_to_the_status_callback(
    spans: InMemorySpanExporter,
    in_process_processor: None,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    _order, root = place_traced_order(orders, user.id, money("USD", 7), engine)
    trace_id = root.trace_id

    def callback_served() -> bool:
        names = {(span.kind, span.name) for span in in_trace(spans, trace_id)}
        return (SpanKind.SERVER, BATCH_UPDATE) in names

    # The server span ends just after the status it committed is visible.
    assert wait_until(callback_served, timeout=30), [
        (span.kind, span.name) for span in in_trace(spans, trace_id)
    ]
    traced = in_trace(spans, trace_id)
    (placed,) = [span for span in traced if span.name == "place an order"]
    # Each hop is a child of the one before, all in the trace the caller of CreateOrder started.
    called = child(traced, placed, SpanKind.CLIENT)
    served = child(traced, called, SpanKind.SERVER)
    published = child(traced, served, SpanKind.PRODUCER)
    consumed = child(traced, published, SpanKind.CONSUMER)
    settling = child(traced, consumed, SpanKind.INTERNAL)
    callback = child(traced, settling, SpanKind.CLIENT)
    settled = child(traced, callback, SpanKind.SERVER)

    assert (called.name, served.name) == (CREATE_ORDER, CREATE_ORDER)
    assert (published.name, consumed.name) == (
        f"publish {KAFKA.orders_topic}",
        f"process {KAFKA.orders_topic}",
    )
    assert (callback.name, settled.name) == (BATCH_UPDATE, BATCH_UPDATE)
    assert consumed.context is not None
    assert [link.context.span_id for link in settling.links] == [consumed.context.span_id]
    # The order's row was written under the server span of CreateOrder.
    statements = [
        span
        for span in traced
        if span.parent and served.context and span.parent.span_id == served.context.span_id
    ]
    assert any(s.attributes and s.attributes.get("db.system.name") for s in statements)
    assert served.attributes and served.attributes["rpc.grpc.status_code"] == 0


@pytest.fixture
def processor_process(
    order_server: RunningService, relay: RelayHandle, spans: InMemorySpanExporter
) -> Iterator[ServiceProcess]:
    """`python -m processor` as deployed: tracing on by default, nothing exported."""
    process = ServiceProcess("processor", "PROCESSOR_HEALTH_PORT", processor_env(order_server))
    yield process
    process.stop()


def test_the_processor_logs_a_settled_order_with_the_trace_id_of_its_creation(
    processor_process: ServiceProcess,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    order, root = place_traced_order(orders, user.id, money("EUR", 8), engine)

    def settled_lines() -> list[dict[str, object]]:
        return [
            line
            for line in list(processor_process.log_lines)
            if line.get("message") == "order processed" and line.get("order_id") == order.id
        ]

    assert wait_until(settled_lines, timeout=10), list(processor_process.log_lines)
    (line,) = settled_lines()
    assert line["trace_id"] == trace.format_trace_id(root.trace_id)
    assert line["span_id"] != trace.format_span_id(root.span_id)


def json_line(record_message: str) -> dict[str, object]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("tests"))
    logger = logging.getLogger("tests.tracing")
    logger.addHandler(handler)
    try:
        logger.warning(record_message)
    finally:
        logger.removeHandler(handler)
    parsed: dict[str, object] = json.loads(stream.getvalue())
    return parsed


def test_log_lines_carry_the_ids_of_the_current_span_and_none_outside_a_trace(
    spans: InMemorySpanExporter,
) -> None:
    with TRACER.start_as_current_span("logging") as span:
        inside = json_line("inside")
    context = span.get_span_context()
    assert inside["trace_id"] == trace.format_trace_id(context.trace_id)
    assert inside["span_id"] == trace.format_span_id(context.span_id)
    outside = json_line("outside")
    assert "trace_id" not in outside and "span_id" not in outside


def test_an_otlp_endpoint_turns_the_exporter_on_and_plaintext_stays_on_loopback() -> None:
    assert TracingSettings.from_env({}).exporter == "none"
    local = TracingSettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert (local.exporter, local.otlp_endpoint) == ("otlp", "http://127.0.0.1:4317")
    with pytest.raises(SettingsError, match="loopback"):
        TracingSettings.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"})
    remote = TracingSettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4317"})
    assert remote.exporter == "otlp"
    assert not TracingSettings.from_env({"OTEL_SDK_DISABLED": "true"}).sdk_enabled
