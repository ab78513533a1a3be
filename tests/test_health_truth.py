"""Health that tells the truth: a relay that fails starts over by itself, the outbox component
turns NOT_SERVING while events wait too long (and back), and the processor reports a stalled
consumer loop. A relay that lost leadership while paused, or whose producer was fenced, never
publishes an event twice where consumers can see it."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest
from confluent_kafka import Producer
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2
from google.type import money_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine, text

from chaos.topics import read_topic
from order_service.service import DEFINITION as ORDER_SERVICE
from processor.__main__ import consumer_health
from servicekit.kafka import producer_config, relay_transactional_id
from servicekit.local_credentials import admin_channel, tls_of
from servicekit.outbox import OutboxRelay, event_source
from servicekit.server import (
    OUTBOX_HEALTH_NAME,
    Endpoint,
    GrpcServer,
    HealthWatch,
    RunningService,
    start_service,
)
from servicekit.tls import open_channel
from tests.conftest import KAFKA, RelayHandle, new_relay, service_settings
from testsupport.processes import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ORDER_SOURCE = event_source("order_service")


def health_of(port: int, service: str) -> int:
    with open_channel(f"127.0.0.1:{port}", tls_of("client")) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(reply.status)


def unpublished_orders(engine: Engine) -> int:
    query = text("SELECT count(*) FROM outbox_events WHERE source = :source")
    with engine.connect() as connection:
        return int(connection.execute(query, {"source": ORDER_SOURCE}).scalar_one())


def place(orders: orders_pb2_grpc.OrderServiceStub, user_id: str, count: int) -> None:
    for _ in range(count):
        orders.CreateOrder(
            orders_pb2.CreateOrderRequest(
                user_id=user_id, amount=money_pb2.Money(currency_code="USD", units=1)
            )
        )


class FailsOnFirstProduce:
    """A producer whose first produce raises what nobody foresaw (not a Kafka error)."""

    def __init__(self, real: Producer) -> None:
        self._real = real
        self.failed = False

    def produce(self, *args: Any, **kwargs: Any) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected: an unforeseen failure inside the relay")
        self._real.produce(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def relays_stopped(relay: RelayHandle) -> Iterator[None]:
    """The run's relays stopped for the test, started again after it."""
    relay.stop()
    yield
    relay.start()


def test_a_relay_that_fails_in_an_unforeseen_way_starts_over_with_a_new_producer(
    relays_stopped: None,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    made: list[object] = []

    class RelayWithAFaultyFirstProducer(OutboxRelay):
        def _new_producer(self) -> Any:
            producer = super()._new_producer()
            made.append(producer)
            return FailsOnFirstProduce(producer) if len(made) == 1 else producer

    relay = new_relay(relay_class=RelayWithAFaultyFirstProducer)
    relay.start()
    try:
        place(orders, user.id, 5)
        assert wait_until(lambda: unpublished_orders(engine) == 0, timeout=30)
        assert relay.is_alive()
        assert len(made) >= 2  # the failed one was replaced
    finally:
        relay.stop()


@pytest.fixture
def watched_order_service(database_url: str) -> Iterator[RunningService]:
    """An order_service without a relay of its own, whose health looks often and allows events
    to wait 1 s."""
    settings = service_settings(
        "order_service",
        OUTBOX_RELAY_ENABLED="false",
        OUTBOX_MAX_AGE_SECONDS="1",
        HEALTH_CHECK_INTERVAL_SECONDS="0.2",
    )
    running = start_service(ORDER_SERVICE, settings)
    yield running
    running.stop(grace_seconds=1)


def test_the_outbox_turns_not_serving_while_events_wait_and_back_once_published(
    relays_stopped: None,
    user: users_pb2.User,
    watched_order_service: RunningService,
    engine: Engine,
) -> None:
    port = watched_order_service.port
    assert wait_until(lambda: health_of(port, OUTBOX_HEALTH_NAME) == SERVING, timeout=5)
    with admin_channel(f"127.0.0.1:{port}") as channel:
        place(orders_pb2_grpc.OrderServiceStub(channel), user.id, 3)

    # Nobody publishes: past OUTBOX_MAX_AGE_SECONDS the component says so, the service not.
    assert wait_until(lambda: health_of(port, OUTBOX_HEALTH_NAME) == NOT_SERVING, timeout=10)
    assert health_of(port, "") == SERVING

    publisher = new_relay()
    publisher.start()
    try:
        assert wait_until(lambda: health_of(port, OUTBOX_HEALTH_NAME) == SERVING, timeout=20)
    finally:
        publisher.stop()
    assert unpublished_orders(engine) == 0


def test_a_stalled_consumer_loop_turns_the_processor_not_serving_and_back() -> None:
    progress = [time.monotonic()]
    server = GrpcServer(
        Endpoint("ecommerce.processor", "127.0.0.1", 0, tls_of("processor"), reflection=False),
        futures.ThreadPoolExecutor(max_workers=2),
    )
    watch = HealthWatch(consumer_health(lambda: progress[0], 0.5), server.report, interval=0.1)
    watch.start()
    try:
        assert health_of(server.port, "ecommerce.processor") == SERVING
        # The loop stops coming round (stuck in a callback, or hung).
        assert wait_until(lambda: health_of(server.port, "") == NOT_SERVING, timeout=5)
        progress[0] = time.monotonic() + 3600  # it moves again
        assert wait_until(lambda: health_of(server.port, "") == SERVING, timeout=5)
    finally:
        watch.stop()
        server.stop(grace_seconds=1)


def committed_event_ids(user_id: str) -> Counter[str]:
    """How often each event keyed by `user_id` is in the orders topic, as the processor reads it
    (read_committed: messages of aborted transactions are skipped)."""
    seen: Counter[str] = Counter()
    for record in read_topic(KAFKA, KAFKA.orders_topic):
        if record.key == user_id.encode():
            seen[record.header("ce_id") or ""] += 1
    return seen


def test_a_leader_silent_past_its_lease_is_fenced_and_a_successor_publishes_each_event_once(
    relays_stopped: None,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    """A paused leader (here: stuck between producing a batch and committing it) loses the lock
    when its lease runs out; the successor's producer fences it, so what it produced is never
    seen and its commit fails when it wakes up."""
    paused, resumed = threading.Event(), threading.Event()

    class RelayThatPausesBeforeItsFirstCommit(OutboxRelay):
        def _commit(self, connection: Any, producer: Producer) -> None:
            if not paused.is_set():
                paused.set()
                resumed.wait(60)
            super()._commit(connection, producer)

    lease = {"OUTBOX_LEADER_LEASE_SECONDS": "2", "OUTBOX_POLL_INTERVAL_SECONDS": "0.5"}
    zombie = new_relay(relay_class=RelayThatPausesBeforeItsFirstCommit, env=lease)
    zombie.start()
    successor = new_relay(env=lease)
    try:
        place(orders, user.id, 5)
        assert paused.wait(30)  # the zombie produced the batch, its transaction open
        successor.start()
        assert wait_until(lambda: unpublished_orders(engine) == 0, timeout=30)
        resumed.set()
        assert wait_until(lambda: zombie.interruptions >= 1, timeout=30)
        assert zombie.published == 0 and zombie.is_alive()
        seen = committed_event_ids(user.id)
        assert len(seen) == 5 and set(seen.values()) == {1}, seen
    finally:
        resumed.set()
        zombie.stop()
        successor.stop()


def test_a_leader_whose_producer_is_fenced_from_outside_carries_on_with_a_new_one(
    relays_stopped: None,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    """A fatal producer error, for real: another producer takes the relays' transactional id."""
    relay = new_relay()
    relay.start()
    try:
        place(orders, user.id, 2)
        assert wait_until(lambda: unpublished_orders(engine) == 0, timeout=30)
        relays_id = relay_transactional_id(KAFKA, "order_service")
        intruder = Producer(producer_config(KAFKA, "intruder", **{"transactional.id": relays_id}))
        intruder.init_transactions(30)  # the relay's producer is fenced from now on
        place(orders, user.id, 3)
        assert wait_until(lambda: unpublished_orders(engine) == 0, timeout=30)
        assert relay.interruptions >= 1 and relay.is_alive()
        seen = committed_event_ids(user.id)
        assert len(seen) == 5 and set(seen.values()) == {1}, seen
    finally:
        relay.stop()
