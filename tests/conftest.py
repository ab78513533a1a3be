"""Fixtures: the real PostgreSQL (schema migrated from scratch each run), the real Kafka broker
(topics of this run only) and real gRPC servers on loopback."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from ecommerce.v1 import orders_pb2_grpc, users_pb2, users_pb2_grpc
from sqlalchemy import Engine, create_engine

from order_service.service import DEFINITION as ORDER_SERVICE
from servicekit.kafka import ensure_topics, grant_access, relay_transactional_id, revoke_access
from servicekit.local_credentials import (
    CERTS_ENV,
    admin_channel,
    as_role,
    channel,
    role_url,
    tls_of,
)
from servicekit.outbox import OutboxRelay, event_source
from servicekit.schema import recreate_disposable_database
from servicekit.server import RunningService, ServiceDefinition, start_service
from servicekit.settings import KafkaSettings, OutboxSettings, ServiceSettings, with_password
from user_service.service import DEFINITION as USER_SERVICE

REPO = Path(__file__).resolve().parent.parent
TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+psycopg2://ecommerce@127.0.0.1:55432/ecommerce_test"
)
RUN_ID = uuid.uuid4().hex[:8]
# Topics of this run only: events of earlier runs (whose rows are gone) never reach its consumers.
TEST_ENV = {
    "DATABASE_URL": TEST_DATABASE_URL,
    "KAFKA_BOOTSTRAP_SERVERS": os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:59092"),
    "KAFKA_ORDERS_TOPIC": f"test-{RUN_ID}.ecommerce.orders.v1",
    "KAFKA_USERS_TOPIC": f"test-{RUN_ID}.ecommerce.users.v1",
    "KAFKA_ORDERS_DLQ_TOPIC": f"test-{RUN_ID}.ecommerce.orders.v1.dlq",
    # One relay for the whole run (the `relay` fixture), which tests may stop and replace.
    "OUTBOX_RELAY_ENABLED": "false",
    "OUTBOX_POLL_INTERVAL_SECONDS": "0.5",
    "OUTBOX_PUBLISH_TIMEOUT_SECONDS": "3",
    # Tests assert on every order they place: none may be shed (tests/test_backpressure.py
    # turns shedding on for a server of its own).
    "BACKPRESSURE_ENABLED": "false",
    "GRPC_REFLECTION_ENABLED": "true",
    "METRICS_PORT": "0",  # any free port: many servers run in one test process
    **CERTS_ENV,
}
# The run's own view of Kafka (topics, reading what was published): the operator's identity.
KAFKA = KafkaSettings.from_env(TEST_ENV, tls_of("admin"))
PROCESSOR_GROUP = f"test-{RUN_ID}-order-processor"


def service_settings(service_name: str, **env: str) -> ServiceSettings:
    """Settings for a server on an ephemeral loopback port (port 0), against this run's test
    database and topics; `env` overrides variables."""
    own_role = {"DATABASE_URL": role_url(TEST_DATABASE_URL, service_name)}
    return ServiceSettings.from_env(
        service_name, "UNUSED_PORT_VARIABLE", 0, env={**TEST_ENV, **own_role, **env}
    )


def new_relay(
    service_name: str = "order_service",
    relay_class: type[OutboxRelay] = OutboxRelay,
    env: dict[str, str] | None = None,
) -> OutboxRelay:
    """A relay of the service's events, as the service would run it (`relay_class`: one with a
    seam a test uses to inject a fault)."""
    merged = {**TEST_ENV, **(env or {})}
    return relay_class(
        as_role(TEST_DATABASE_URL, service_name),
        KafkaSettings.from_env(merged, tls_of(service_name)),
        OutboxSettings.from_env(merged),
        event_source(service_name),
        client_id=f"test-relay-{uuid.uuid4().hex[:6]}",
        transactional_id=relay_transactional_id(KAFKA, service_name),
    )


@pytest.fixture(scope="session")
def kafka_topics() -> Iterator[KafkaSettings]:
    """This run's topics on the real broker and their ACLs, deleted when the run ends."""
    ensure_topics(KAFKA, timeout_seconds=30)
    grant_access(KAFKA, PROCESSOR_GROUP)
    yield KAFKA
    revoke_access(KAFKA, PROCESSOR_GROUP)
    admin = AdminClient(KAFKA.client_config())
    topics = [KAFKA.orders_topic, KAFKA.users_topic, KAFKA.orders_dlq_topic]
    for future in admin.delete_topics(topics, request_timeout=10).values():
        future.result()


@pytest.fixture(scope="session")
def database_url(kafka_topics: KafkaSettings) -> str:
    recreate_disposable_database(TEST_DATABASE_URL)
    return TEST_DATABASE_URL


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(with_password(database_url))  # the owner role: tests look at everything
    yield engine
    engine.dispose()


class RelayHandle:
    """The run's outbox relays, one per service; a test may stop them to simulate an outage,
    then start new ones."""

    def __init__(self) -> None:
        self.current: list[OutboxRelay] = []

    def start(self) -> None:
        if not self.current:
            self.current = [new_relay("user_service"), new_relay("order_service")]
            for relay in self.current:
                relay.start()

    def stop(self) -> None:
        for relay in self.current:
            relay.stop()
        self.current = []


@pytest.fixture(scope="session")
def relay(database_url: str) -> Iterator[RelayHandle]:
    handle = RelayHandle()
    handle.start()
    yield handle
    handle.stop()


def _serve(definition: ServiceDefinition, name: str) -> Iterator[RunningService]:
    running = start_service(definition, service_settings(name))
    yield running
    running.stop(grace_seconds=1)


@pytest.fixture(scope="session")
def user_server(database_url: str) -> Iterator[RunningService]:
    yield from _serve(USER_SERVICE, "user_service")


@pytest.fixture(scope="session")
def order_server(database_url: str) -> Iterator[RunningService]:
    yield from _serve(ORDER_SERVICE, "order_service")


@pytest.fixture(scope="session")
def users(user_server: RunningService) -> Iterator[users_pb2_grpc.UserServiceStub]:
    with admin_channel(f"localhost:{user_server.port}") as channel:
        yield users_pb2_grpc.UserServiceStub(channel)


@pytest.fixture(scope="session")
def orders(order_server: RunningService) -> Iterator[orders_pb2_grpc.OrderServiceStub]:
    with admin_channel(f"localhost:{order_server.port}") as channel:
        yield orders_pb2_grpc.OrderServiceStub(channel)


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}@example.com"


@pytest.fixture
def user(users: users_pb2_grpc.UserServiceStub) -> users_pb2.User:
    """A fresh user, so that no test depends on rows another test wrote."""
    created: users_pb2.User = users.CreateUser(
        users_pb2.CreateUserRequest(email=unique_email(), name="Test User")
    )
    return created


@pytest.fixture(scope="session")
def settlements(order_server: RunningService) -> Iterator[orders_pb2_grpc.OrderServiceStub]:
    """OrderService as the processor calls it: with the processor's certificate, no token."""
    with channel(f"localhost:{order_server.port}", "processor") as processor_channel:
        yield orders_pb2_grpc.OrderServiceStub(processor_channel)
