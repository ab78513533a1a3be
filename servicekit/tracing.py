"""Traces (OpenTelemetry): one tracer provider per process, named after it; the W3C trace context
carried in gRPC metadata, outbox rows and Kafka headers; a span around each RPC served or called,
each database statement, each event published and each event consumed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from servicekit.settings import SettingsError, env_bool, env_text, is_loopback

TRACEPARENT = "traceparent"
# Resolves to the process's provider once start_tracing installed one; a no-op until then.
TRACER = trace.get_tracer("servicekit")
# W3C trace context only: baggage from callers is not taken in.
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = frozenset(_PROPAGATOR.fields)
# Codes a server span marks as its failure (OTel's gRPC conventions); others are the caller's.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


_TRACES_EXPORTERS = ("none", "otlp", "console")


@dataclass(frozen=True)
class TracingSettings:
    """OpenTelemetry, from its standard variables. Spans are made and
    trace ids logged and propagated unless OTEL_SDK_DISABLED=true; they leave the process only
    when OTEL_TRACES_EXPORTER says where (`otlp` by default once an OTLP endpoint is set)."""

    sdk_enabled: bool
    exporter: str
    otlp_endpoint: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TracingSettings:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        exporter = env_text(env, "OTEL_TRACES_EXPORTER", "otlp" if endpoint else "none").lower()
        if exporter not in _TRACES_EXPORTERS:
            choices = ", ".join(_TRACES_EXPORTERS)
            raise SettingsError(f"OTEL_TRACES_EXPORTER must be one of {choices}")
        if exporter == "otlp" and endpoint:
            _check_otlp_endpoint(endpoint)
        return cls(
            sdk_enabled=not env_bool(env, "OTEL_SDK_DISABLED", False),
            exporter=exporter,
            otlp_endpoint=endpoint,
        )


def _check_otlp_endpoint(endpoint: str) -> None:
    """Spans name methods and ids: in plaintext to loopback only, as every other connection."""
    host = endpoint.removeprefix("http://").split("/", 1)[0]
    if endpoint.startswith("http://") and not is_loopback(host):
        raise SettingsError(
            f"an OTLP endpoint over http:// is allowed on loopback only, not {endpoint!r}:"
            " use https://"
        )


def start_tracing(
    service_name: str, settings: TracingSettings, *processors: SpanProcessor
) -> TracerProvider | None:
    """Installs this process's tracer provider (once per process): spans named `service_name`,
    exported where the settings say and handed to `processors` (tests). None when the SDK is
    disabled: trace context is then passed on, but no span is made."""
    if not settings.sdk_enabled:
        return None
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    exporter = _exporter(settings)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def _exporter(settings: TracingSettings) -> SpanExporter | None:
    if settings.exporter == "otlp":
        # Imported when used: a process that exports nothing loads no exporter.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    if settings.exporter == "console":
        return ConsoleSpanExporter()
    return None


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, None outside any trace."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


def context_of(traceparent: str | None) -> Context | None:
    """The trace context a traceparent names (None: the current context)."""
    return _PROPAGATOR.extract({TRACEPARENT: traceparent}) if traceparent else None


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def served_rpc(method: str, metadata: Iterable[tuple[str, Any]]) -> AbstractContextManager[Span]:
    """The SERVER span of an RPC, current while inside: a child of the caller's span when its
    metadata carries a traceparent."""
    carrier = {key: value for key, value in metadata if key in _TRACE_HEADERS}
    return TRACER.start_as_current_span(
        method.lstrip("/"),
        context=_PROPAGATOR.extract(carrier),
        kind=SpanKind.SERVER,
        attributes=_rpc_attributes(method),
        record_exception=False,  # the status code says it; the access log has the rest
        set_status_on_exception=False,
    )


def rpc_ended(span: Span, code: grpc.StatusCode, served: bool = True) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS or (not served and code != grpc.StatusCode.OK):
        span.set_status(StatusCode.ERROR, code.name)


class TracedCalls(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """A CLIENT span around every unary call of a channel, its context sent as `traceparent`."""

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        method = str(client_call_details.method)
        span = TRACER.start_span(
            method.lstrip("/"), kind=SpanKind.CLIENT, attributes=_rpc_attributes(method)
        )
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        metadata = [*(client_call_details.metadata or ()), *carrier.items()]
        try:
            outcome = continuation(client_call_details._replace(metadata=metadata), request)
        except BaseException:
            span.end()
            raise
        outcome.add_done_callback(_ending(span))
        return outcome


def _ending(span: Span) -> Callable[[Any], None]:
    def end(call: Any) -> None:
        rpc_ended(span, call.code(), served=False)
        span.end()

    return end


@contextmanager
def database_statement(sql: str) -> Iterator[Span]:
    """A CLIENT span around one statement: its SQL, with placeholders, never the values (nor an
    error's message, which may quote them)."""
    with TRACER.start_as_current_span(
        sql.split(None, 1)[0].upper(),
        kind=SpanKind.CLIENT,
        attributes={"db.system.name": "postgresql", "db.query.text": sql},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except Exception as error:
            span.set_status(StatusCode.ERROR, type(error).__name__)
            raise


@contextmanager
def publishing(topic: str, traceparent: str | None) -> Iterator[str | None]:
    """A PRODUCER span while an event is handed to Kafka, a child of the call that wrote the
    event; yields the traceparent to send with it (the writer's own when no span is made)."""
    with TRACER.start_as_current_span(
        f"publish {topic}",
        context=context_of(traceparent),
        kind=SpanKind.PRODUCER,
        attributes=_messaging_attributes(topic, "publish"),
    ):
        yield current_traceparent()


def consuming(topic: str, traceparent: str | None) -> Span:
    """A CONSUMER span for one consumed event, a child of its publisher's span; started, not made
    current (trace.use_span makes it current for the work of that event)."""
    return TRACER.start_span(
        f"process {topic}",
        context=context_of(traceparent),
        kind=SpanKind.CONSUMER,
        attributes=_messaging_attributes(topic, "process"),
    )


def for_many(name: str, spans: Sequence[Span]) -> AbstractContextManager[Span]:
    """A span for work done for many events at once: a child of the first event's span, linked
    to each (OTel's convention for batches), current while inside."""
    parent = trace.set_span_in_context(spans[0]) if spans else None
    links = [Link(span.get_span_context()) for span in spans]
    return TRACER.start_as_current_span(name, context=parent, links=links)


def _messaging_attributes(topic: str, operation: str) -> dict[str, str]:
    return {
        "messaging.system": "kafka",
        "messaging.destination.name": topic,
        "messaging.operation.type": operation,
    }


def log_fields() -> dict[str, str]:
    """trace_id and span_id of the current span, for a log line; none outside a trace."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {
        "trace_id": trace.format_trace_id(context.trace_id),
        "span_id": trace.format_span_id(context.span_id),
    }
