"""Fixtures: the real PostgreSQL (migrated once per run) and real gRPC servers on loopback."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from alembic import command
from alembic.config import Config
from ecommerce.v1 import orders_pb2_grpc, users_pb2, users_pb2_grpc
from sqlalchemy import Engine, create_engine, text

from order_service.service import DEFINITION as ORDER_SERVICE
from servicekit.server import RunningService, ServiceDefinition, start_service
from servicekit.settings import ServiceSettings
from user_service.service import DEFINITION as USER_SERVICE

REPO = Path(__file__).resolve().parent.parent
TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+psycopg2://ecommerce@127.0.0.1:55432/ecommerce_test"
)


def service_settings(service_name: str, database_url: str = TEST_DATABASE_URL) -> ServiceSettings:
    """Settings for a server on an ephemeral loopback port (port 0)."""
    base = ServiceSettings.from_env(service_name, "UNUSED_PORT_VARIABLE", 0, env={})
    return replace(base, database_url=database_url)


def migrate(database_url: str) -> None:
    config = Config(str(REPO / "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")


def recreate_schema(database_url: str) -> None:
    """An empty test database each run: the migrations are applied from scratch every time."""
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(scope="session")
def database_url() -> str:
    recreate_schema(TEST_DATABASE_URL)
    migrate(TEST_DATABASE_URL)
    return TEST_DATABASE_URL


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def _serve(definition: ServiceDefinition, name: str) -> Iterator[grpc.Channel]:
    running: RunningService = start_service(definition, service_settings(name))
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield channel
    running.stop(grace_seconds=1)


@pytest.fixture(scope="session")
def user_channel(database_url: str) -> Iterator[grpc.Channel]:
    yield from _serve(USER_SERVICE, "user_service")


@pytest.fixture(scope="session")
def order_channel(database_url: str) -> Iterator[grpc.Channel]:
    yield from _serve(ORDER_SERVICE, "order_service")


@pytest.fixture(scope="session")
def users(user_channel: grpc.Channel) -> users_pb2_grpc.UserServiceStub:
    return users_pb2_grpc.UserServiceStub(user_channel)


@pytest.fixture(scope="session")
def orders(order_channel: grpc.Channel) -> orders_pb2_grpc.OrderServiceStub:
    return orders_pb2_grpc.OrderServiceStub(order_channel)


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}@example.com"


@pytest.fixture
def user(users: users_pb2_grpc.UserServiceStub) -> users_pb2.User:
    """A fresh user, so that no test depends on rows another test wrote."""
    created: users_pb2.User = users.CreateUser(
        users_pb2.CreateUserRequest(email=unique_email(), name="Test User")
    )
    return created
