"""WatchOrder and CancelOrder on the real stack: a watcher sees an order settled by the processor
(or cancelled by its owner) as it commits, a thousand watchers on one server all see theirs, and a
cancelled order is never processed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2
from sqlalchemy import Engine, text

from chaos.topics import read_topic
from servicekit.local_credentials import tls_of, token
from servicekit.server import RunningService
from servicekit.tls import open_channel
from tests.conftest import KAFKA, RelayHandle
from tests.rpc_errors import call_fails
from tests.test_eventing import money, processor_env, wait_until_terminal
from testsupport.processes import ServiceProcess

CREATED = orders_pb2.ORDER_STATUS_CREATED
PROCESSED = orders_pb2.ORDER_STATUS_PROCESSED
CANCELLED = orders_pb2.ORDER_STATUS_CANCELLED
WATCHERS = 1000
STREAMS_PER_CHANNEL = 100  # the server's max_concurrent_streams per connection


@pytest.fixture(scope="module")
def settling(order_server: RunningService, relay: RelayHandle) -> Iterator[None]:
    """The processor, settling every order the run places."""
    process = ServiceProcess("processor", "PROCESSOR_HEALTH_PORT", processor_env(order_server))
    yield
    process.stop()


@contextmanager
def nothing_published(relay: RelayHandle) -> Iterator[None]:
    """Events wait in the outbox while inside: no processor settles an order placed inside
    before the test cancels it (its OrderCreated then meets a cancelled order)."""
    relay.stop()
    try:
        yield
    finally:
        relay.start()


def place(orders: orders_pb2_grpc.OrderServiceStub, user_id: str) -> orders_pb2.Order:
    request = orders_pb2.CreateOrderRequest(user_id=user_id, amount=money("USD", 5))
    order: orders_pb2.Order = orders.CreateOrder(request)
    return order


def watch(
    orders: orders_pb2_grpc.OrderServiceStub, order_id: str, timeout: float = 60
) -> Iterator[orders_pb2.Order]:
    return iter(orders.WatchOrder(orders_pb2.WatchOrderRequest(id=order_id), timeout=timeout))


def history(engine: Engine, order_id: str) -> list[str]:
    query = text(
        "SELECT new_status FROM order_status_changes WHERE order_id = CAST(:id AS uuid)"
        " ORDER BY change_time"
    )
    with engine.connect() as connection:
        return list(connection.execute(query, {"id": order_id}).scalars())


def test_a_watcher_sees_the_order_created_then_processed_and_the_stream_ends(
    settling: None, user: users_pb2.User, orders: orders_pb2_grpc.OrderServiceStub
) -> None:
    order = place(orders, user.id)

    seen = [(o.status, o.id) for o in watch(orders, order.id)]

    assert seen[-1] == (PROCESSED, order.id)
    assert seen[0][0] in (CREATED, PROCESSED)  # settled already, if the processor was quicker
    assert len(seen) <= 2


def test_a_cancelled_order_is_never_processed_and_its_watcher_sees_cancelled(
    order_server: RunningService,
    relay: RelayHandle,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    with nothing_published(relay):
        order = place(orders, user.id)
        stream = watch(orders, order.id)
        assert next(stream).status == CREATED
        cancelled = orders.CancelOrder(orders_pb2.CancelOrderRequest(id=order.id, reason="changed"))

    assert (cancelled.status, cancelled.status_reason) == (CANCELLED, "changed")
    final = next(stream)
    assert (final.status, final.status_reason) == (CANCELLED, "changed")
    assert list(stream) == []  # the stream ended: CANCELLED is final
    again = orders.CancelOrder(orders_pb2.CancelOrderRequest(id=order.id, reason="twice"))
    assert again.status_reason == "changed"  # cancelling again is a no-op


def test_the_processor_leaves_a_cancelled_order_cancelled_without_dead_letters(
    settling: None,
    relay: RelayHandle,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    """Its OrderCreated reaches the processor after the cancel: the order is done, no DLQ."""
    with nothing_published(relay):
        order = place(orders, user.id)
        orders.CancelOrder(orders_pb2.CancelOrderRequest(id=order.id, reason="too slow"))
    marker = place(orders, user.id)  # the same key: after the order's events in the partition
    wait_until_terminal(engine, [marker.id])

    assert history(engine, order.id) == ["CANCELLED"]
    dead = [r for r in read_topic(KAFKA, KAFKA.orders_dlq_topic) if r.key == user.id.encode()]
    assert dead == []


def test_a_settled_order_cannot_be_cancelled(
    settling: None, user: users_pb2.User, orders: orders_pb2_grpc.OrderServiceStub
) -> None:
    order = place(orders, user.id)
    assert list(watch(orders, order.id))[-1].status == PROCESSED

    failure = call_fails(orders.CancelOrder, orders_pb2.CancelOrderRequest(id=order.id))

    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "ORDER_STATUS_TRANSITION_NOT_ALLOWED"


def test_watching_an_unknown_order_is_not_found_for_an_admin(
    order_server: RunningService, orders: orders_pb2_grpc.OrderServiceStub
) -> None:
    failure = call_fails(
        lambda request: list(orders.WatchOrder(request, timeout=10)),
        orders_pb2.WatchOrderRequest(id="7b1e3a40-5c1d-4c8e-9a51-5d2f0f9d2b11"),
    )

    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND")


def test_a_thousand_watchers_on_one_server_all_see_their_order_cancelled(
    order_server: RunningService,
    relay: RelayHandle,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
) -> None:
    # Each its own connection (channels alike share one by default), at most 100 streams each.
    channels = [
        open_channel(
            f"localhost:{order_server.port}",
            tls_of("client"),
            token(),
            options=[("grpc.use_local_subchannel_pool", 1)],
        )
        for _ in range(WATCHERS // STREAMS_PER_CHANNEL)
    ]
    stubs = [orders_pb2_grpc.OrderServiceStub(channel) for channel in channels]
    opened = threading.Barrier(WATCHERS + 1, timeout=120)

    def watch_one(order_id: str, stub: orders_pb2_grpc.OrderServiceStub) -> list[int]:
        stream = watch(stub, order_id, timeout=180)
        statuses = [int(next(stream).status)]
        opened.wait()  # every stream is open before any order changes
        statuses.extend(int(o.status) for o in stream)
        return statuses

    pool = ThreadPoolExecutor(max_workers=WATCHERS)
    try:
        with nothing_published(relay):
            placed = [place(orders, user.id).id for _ in range(WATCHERS)]
            watching = [
                pool.submit(watch_one, order_id, stubs[index % len(stubs)])
                for index, order_id in enumerate(placed)
            ]
            opened.wait()
            for order_id in placed:
                orders.CancelOrder(orders_pb2.CancelOrderRequest(id=order_id))
        seen = [future.result(timeout=180) for future in watching]
    finally:
        pool.shutdown(cancel_futures=True)
        for channel in channels:
            channel.close()

    assert all(statuses == [CREATED, CANCELLED] for statuses in seen)
