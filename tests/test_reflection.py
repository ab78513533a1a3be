"""Server reflection under grpc.reflection.v1 and v1alpha: a v1 client, a v1alpha client and
grpcurl (which tries v1 first) against servers on loopback over mutual TLS."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from ecommerce.v1 import orders_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_pb2_grpc
from grpc_reflection_v1 import reflection_pb2 as v1_pb2
from grpc_reflection_v1 import reflection_pb2_grpc as v1_pb2_grpc

from servicekit.local_credentials import channel, tls_of
from servicekit.server import Endpoint, GrpcServer, RunningService
from tests.test_service_processes import grpcurl

ORDER_SERVICE = orders_pb2.DESCRIPTOR.services_by_name["OrderService"]
LISTED = {
    ORDER_SERVICE.full_name,
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


def reflect_v1(
    address: str, requests: list[v1_pb2.ServerReflectionRequest]
) -> list[v1_pb2.ServerReflectionResponse]:
    """The answers of grpc.reflection.v1, to a holder of a certificate of our CA (no token)."""
    with channel(address, "client") as reflection_channel:
        stub = v1_pb2_grpc.ServerReflectionStub(reflection_channel)
        return list(stub.ServerReflectionInfo(iter(requests), timeout=10))


def pool_of(files: list[bytes]) -> descriptor_pool.DescriptorPool:
    """A pool of the serialized FileDescriptorProtos reflection sent, added dependencies first."""
    pending = {descriptor_pb2.FileDescriptorProto.FromString(file).name: file for file in files}
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    while pending:
        ready = [
            name
            for name, file in pending.items()
            if set(descriptor_pb2.FileDescriptorProto.FromString(file).dependency) <= added
        ]
        assert ready, f"dependencies missing from the answer: {sorted(pending)}"
        for name in ready:
            pool.AddSerializedFile(pending.pop(name))
            added.add(name)
    return pool


def test_a_v1_client_lists_and_describes_the_services(order_server: RunningService) -> None:
    listed, described, itself = reflect_v1(
        f"localhost:{order_server.port}",
        [
            v1_pb2.ServerReflectionRequest(list_services=""),
            v1_pb2.ServerReflectionRequest(file_containing_symbol=ORDER_SERVICE.full_name),
            v1_pb2.ServerReflectionRequest(
                file_containing_symbol="grpc.reflection.v1.ServerReflection"
            ),
        ],
    )
    assert {service.name for service in listed.list_services_response.service} == LISTED

    pool = pool_of(list(described.file_descriptor_response.file_descriptor_proto))
    service = pool.FindServiceByName(ORDER_SERVICE.full_name)
    assert [method.name for method in service.methods] == [m.name for m in ORDER_SERVICE.methods]
    create = service.methods_by_name["CreateOrder"]
    assert create.input_type.full_name == "ecommerce.v1.CreateOrderRequest"
    assert [field.name for field in create.input_type.fields] == [
        field.name for field in orders_pb2.CreateOrderRequest.DESCRIPTOR.fields
    ]

    reflection_v1 = pool_of(list(itself.file_descriptor_response.file_descriptor_proto))
    info = reflection_v1.FindServiceByName("grpc.reflection.v1.ServerReflection")
    assert [method.name for method in info.methods] == ["ServerReflectionInfo"]


def test_v1_and_v1alpha_give_the_same_answers(order_server: RunningService) -> None:
    address = f"localhost:{order_server.port}"
    questions = [
        v1_pb2.ServerReflectionRequest(list_services=""),
        v1_pb2.ServerReflectionRequest(file_containing_symbol=ORDER_SERVICE.full_name),
        v1_pb2.ServerReflectionRequest(file_by_filename="ecommerce/v1/users.proto"),
        v1_pb2.ServerReflectionRequest(file_containing_symbol="ecommerce.v1.NoSuchService"),
    ]
    v1 = reflect_v1(address, questions)
    with channel(address, "client") as reflection_channel:
        stub = v1alpha_pb2_grpc.ServerReflectionStub(reflection_channel)
        requests = [
            v1alpha_pb2.ServerReflectionRequest.FromString(q.SerializeToString()) for q in questions
        ]
        v1alpha = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    # The same servicer behind both names: byte for byte the same messages.
    assert [m.SerializeToString() for m in v1] == [m.SerializeToString() for m in v1alpha]
    assert v1[-1].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_grpcurl_lists_and_describes_through_reflection(order_server: RunningService) -> None:
    address = f"localhost:{order_server.port}"
    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == LISTED

    described = grpcurl(address, "describe", ORDER_SERVICE.full_name)
    assert described.returncode == 0, described.stderr
    assert f"{ORDER_SERVICE.full_name} is a service:" in described.stdout
    for method in ORDER_SERVICE.methods:
        assert f"rpc {method.name} (" in described.stdout

    request = grpcurl(address, "describe", "ecommerce.v1.CreateOrderRequest")
    assert request.returncode == 0, request.stderr
    assert "string user_id = 1" in request.stdout


class MethodRecorder(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Remembers the full name of every method called."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        self.methods.append(handler_call_details.method)
        return await continuation(handler_call_details)


@pytest.fixture
def recorded_server() -> Iterator[tuple[GrpcServer, MethodRecorder]]:
    """A server whose reflection lists OrderService (no handlers behind it) and that records
    every method called."""
    recorder = MethodRecorder()
    server = GrpcServer(
        Endpoint(ORDER_SERVICE.full_name, "127.0.0.1", 0, tls_of("order_service"), reflection=True),
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[recorder],
    )
    yield server, recorder
    server.stop(grace_seconds=1)


def test_grpcurl_asks_reflection_v1(recorded_server: tuple[GrpcServer, MethodRecorder]) -> None:
    server, recorder = recorded_server
    described = grpcurl(
        f"localhost:{server.port}", "describe", ORDER_SERVICE.full_name, bearer=None
    )
    assert described.returncode == 0, described.stderr
    # v1 answered, so grpcurl never fell back to v1alpha.
    assert set(recorder.methods) == {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"}
