"""A loop turn of the processor stays under its max.poll.interval.ms however many orders of a batch
stay NOT_FOUND: the consumer is never evicted, and each event has exactly one outcome."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

from confluent_kafka import Producer
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2
from sqlalchemy import Engine

from chaos.topics import read_topic
from processor.__main__ import open_processor
from processor.consumer import OrderEventProcessor, worst_loop_turn_seconds
from processor.settings import ProcessorSettings
from servicekit.server import RunningService
from tests.conftest import KAFKA, RelayHandle
from tests.test_eventing import (
    money,
    order_created_headers,
    place_orders,
    processor_env,
    statuses,
    transitions,
    unpublished,
    wait_until_terminal,
)
from testsupport.processes import wait_until

# The shortest the consumer accepts (its session timeout); the callback settings give a worst
# loop turn of 2 + 2 x 1 = 4 s, which the processor's settings check against it.
TURN_BOUND = {
    "PROCESSOR_MAX_POLL_INTERVAL_MS": "10000",
    "CALLBACK_RETRY_SECONDS": "2",
    "CALLBACK_TIMEOUT_SECONDS": "1",
}
ROUNDS = 4
MISSING_PER_ROUND = 40
REAL_PER_ROUND = 10


def missing_order_created(user_id: str) -> events_pb2.OrderCreated:
    """An OrderCreated of an order no row will ever hold."""
    event = events_pb2.OrderCreated(
        event_id=str(uuid.uuid4()),
        order=orders_pb2.Order(
            id=str(uuid.uuid4()),
            user_id=user_id,
            amount=money("USD", 3),
            status=orders_pb2.ORDER_STATUS_CREATED,
        ),
    )
    event.occur_time.GetCurrentTime()
    return event


def dead_lettered_order_ids(user_id: str) -> Counter[str]:
    """Order id -> how many times its event is in the DLQ, for the events keyed by `user_id`."""
    return Counter(
        events_pb2.OrderCreated.FromString(record.value or b"").order.id
        for record in read_topic(KAFKA, KAFKA.orders_dlq_topic)
        if record.key == user_id.encode() and record.header("dlq_reason") == "CALLBACK_NOT_FOUND"
    )


class RunningProcessor:
    """The processor's consume loop in a thread of this process, so that its own measurements
    (the longest gap between polls, the rebalances) can be read."""

    def __init__(self, settings: ProcessorSettings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self.loop, self._close = open_processor(settings, self._stop)
        self._thread = threading.Thread(target=self.loop.run, name="processor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._close()


def produce_missing_orders(user_id: str, count: int) -> list[str]:
    producer = Producer(KAFKA.client_config(acks="all"))
    order_ids = []
    for _ in range(count):
        event = missing_order_created(user_id)
        producer.produce(
            KAFKA.orders_topic,
            key=user_id.encode(),
            value=event.SerializeToString(),
            headers=order_created_headers(event),
        )
        order_ids.append(event.order.id)
    assert producer.flush(10) == 0
    return order_ids


def passed_a_poll_after(loop: OrderEventProcessor, moment: float) -> bool:
    return loop.last_progress > moment


def test_batches_full_of_orders_not_found_never_get_the_consumer_evicted(
    order_server: RunningService,
    relay: RelayHandle,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    # Same key, same partition: the missing orders' events and the real ones interleave, so that
    # the batches the processor reads hold both.
    missing: list[str] = []
    real: list[str] = []
    for _ in range(ROUNDS):
        missing += produce_missing_orders(user.id, MISSING_PER_ROUND)
        real += place_orders(orders, user.id, "USD", REAL_PER_ROUND)
    assert wait_until(lambda: unpublished(engine) == 0, timeout=30)  # all on the topic

    running = RunningProcessor(
        ProcessorSettings.from_env({**processor_env(order_server), **TURN_BOUND})
    )
    try:
        wait_until_terminal(engine, real, timeout=60)
        assert wait_until(
            lambda: sum(dead_lettered_order_ids(user.id).values()) >= len(missing),
            timeout=60,
            interval=0.5,
        ), dead_lettered_order_ids(user.id)
        # A poll after the last of them: an eviction would have shown at it.
        settled = time.monotonic()
        assert wait_until(lambda: passed_a_poll_after(running.loop, settled + 1), timeout=10)
        membership = running.loop.membership
        counts = (membership.assigned, membership.revoked, membership.lost)
        longest = running.loop.longest_poll_gap_seconds
    finally:
        running.stop()

    # Joined once, never evicted (lost) nor rebalanced (revoked) while working.
    assert counts == (1, 0, 0)
    # The processor's own measurement against its own configuration: a turn that retried the
    # NOT_FOUND orders until the deadline, and still polled in time.
    settings = running.settings
    assert longest >= settings.callback_retry_seconds
    assert longest * 1000 < settings.max_poll_interval_ms
    assert (
        worst_loop_turn_seconds(settings.callback_timeout_seconds, settings.callback_retry_seconds)
        * 1000
        < settings.max_poll_interval_ms
    )
    # Each event had exactly one outcome: the real orders settled once, the others dead-lettered
    # once each, none of them both.
    assert set(statuses(engine, real).values()) == {"PROCESSED"}
    assert transitions(engine, real) == dict.fromkeys(real, 1)
    assert dead_lettered_order_ids(user.id) == dict.fromkeys(missing, 1)
