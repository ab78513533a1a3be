"""A service whose database does not answer reports NOT_SERVING and fails calls with UNAVAILABLE."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest
from ecommerce.v1 import users_pb2, users_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servicekit.local_credentials import admin_channel
from servicekit.server import start_service
from tests.conftest import service_settings, unique_email
from tests.rpc_errors import call_fails
from testsupport.processes import free_port
from user_service.service import DEFINITION as USER_SERVICE


@pytest.fixture
def channel_without_database() -> Iterator[grpc.Channel]:
    url = f"postgresql+psycopg2://ecommerce@127.0.0.1:{free_port()}/ecommerce"
    running = start_service(USER_SERVICE, service_settings("user_service", DATABASE_URL=url))
    with admin_channel(f"127.0.0.1:{running.port}") as channel:
        yield channel
    running.stop(grace_seconds=1)


def test_health_is_not_serving_and_calls_are_unavailable(
    channel_without_database: grpc.Channel,
) -> None:
    health = health_pb2_grpc.HealthStub(channel_without_database)
    for service in ("", "ecommerce.v1.UserService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

    users = users_pb2_grpc.UserServiceStub(channel_without_database)
    for call, request in (
        (users.CreateUser, users_pb2.CreateUserRequest(email=unique_email(), name="Nobody")),
        (users.GetUser, users_pb2.GetUserRequest(id=str(uuid.uuid4()))),
        (users.ListUsers, users_pb2.ListUsersRequest()),
    ):
        failure = call_fails(call, request)
        assert failure.code is grpc.StatusCode.UNAVAILABLE
        assert failure.reason == "DATABASE_UNAVAILABLE"


def test_validation_still_answers_without_a_database(
    channel_without_database: grpc.Channel,
) -> None:
    users = users_pb2_grpc.UserServiceStub(channel_without_database)
    failure = call_fails(users.GetUser, users_pb2.GetUserRequest(id="bad"))
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
