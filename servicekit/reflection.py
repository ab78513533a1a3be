"""Server reflection under both of its names: grpc.reflection.v1, which grpcurl and grpcui try
first, and grpc.reflection.v1alpha, the only one grpcio-reflection serves. The two protocols
differ only in their package name, so their messages are the same bytes: one servicer,
grpcio-reflection's, answers both."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

# Imported for its descriptor too: reflection can describe the v1 service it lists.
from grpc_reflection_v1 import reflection_pb2 as reflection_v1_pb2

V1_SERVICE_NAME: str = reflection_v1_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
_METHOD = "ServerReflectionInfo"


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection under both names on `server`, listing `service_names` and itself."""
    names = [*service_names, *SERVICE_NAMES]
    servicer = reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]  # no stub
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(name, {_METHOD: handler}) for name in SERVICE_NAMES]
    )
