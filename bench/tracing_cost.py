"""What tracing costs CreateOrder: the same order_service with the OpenTelemetry SDK off
(OTEL_SDK_DISABLED=true), on as shipped (spans made, nothing exported) and on with every span
exported over OTLP/gRPC to a sink in the bench's own process, in interleaved rounds."""

from __future__ import annotations

import statistics
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.ghz import RpcFigures

# The variants, by name, and what each adds to the order_service's environment.
OFF = "off"
RECORDED = "recorded, not exported"
EXPORTED = "exported (OTLP)"


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on loopback that counts the spans it is sent and drops them."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        add_servicer = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add_servicer(self, self._server)  # type: ignore[no-untyped-call]  # no stubs for it
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
        )
        with self._lock:
            self.spans += received
        return trace_service_pb2.ExportTraceServiceResponse()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(grace=None)


def variant_env(sink: OtlpSink) -> dict[str, dict[str, str]]:
    return {
        OFF: {"OTEL_SDK_DISABLED": "true"},
        RECORDED: {},
        EXPORTED: {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.endpoint},
    }


@dataclass
class TracingRounds:
    """CreateOrder's figures per variant, one entry per round."""

    by_variant: dict[str, list[RpcFigures]] = field(default_factory=dict)

    def add(self, variant: str, figures: RpcFigures) -> None:
        self.by_variant.setdefault(variant, []).append(figures)

    def median_ratio(self, variant: str) -> float:
        """The median over rounds of (variant's RPC/s ÷ OFF's RPC/s in the same round)."""
        pairs = zip(self.by_variant[variant], self.by_variant[OFF], strict=True)
        return statistics.median(on.rps / off.rps for on, off in pairs)
