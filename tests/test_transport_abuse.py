"""Abuse at the transport: oversized messages, garbage bytes, many connections, clients that give
up mid-call. The servers answer properly, stop working for abandoned calls, and stay healthy."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc
from google.type import money_pb2
from sqlalchemy import Connection, Engine, text

from order_service.service import DEFINITION as ORDER_SERVICE
from servicekit import local_credentials as credentials
from servicekit.healthcheck import is_serving
from servicekit.local_credentials import admin_channel, tls_of
from servicekit.server import RunningService, start_service
from tests.conftest import service_settings
from testsupport.processes import wait_until


def test_request_over_the_size_limit_is_resource_exhausted(
    users: users_pb2_grpc.UserServiceStub, user_server: RunningService
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        users.CreateUser(
            users_pb2.CreateUserRequest(email="big@example.com", name="x" * 2_000_000), timeout=10
        )
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert is_serving(f"127.0.0.1:{user_server.port}", tls_of("client"))


@pytest.mark.parametrize(
    "garbage",
    [
        os.urandom(65_536),
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(4096),  # an HTTP/2 preface, then noise
        b"",
    ],
)
def test_garbage_bytes_on_the_port_leave_the_server_healthy(
    order_server: RunningService, garbage: bytes
) -> None:
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", order_server.port), timeout=5) as raw:
            raw.sendall(garbage)
    assert is_serving(f"127.0.0.1:{order_server.port}", tls_of("client"))


def test_many_concurrent_connections_are_all_served(
    user_server: RunningService, user: users_pb2.User
) -> None:
    channels = [admin_channel(f"127.0.0.1:{user_server.port}") for _ in range(200)]
    try:
        stubs = [users_pb2_grpc.UserServiceStub(channel) for channel in channels]
        with ThreadPoolExecutor(max_workers=64) as pool:
            replies = list(
                pool.map(
                    lambda stub: stub.GetUser(users_pb2.GetUserRequest(id=user.id), timeout=30),
                    stubs,
                )
            )
    finally:
        for channel in channels:
            channel.close()
    assert all(reply == user for reply in replies)
    assert is_serving(f"127.0.0.1:{user_server.port}", tls_of("client"))


@pytest.fixture
def locked_order(
    orders: orders_pb2_grpc.OrderServiceStub, user: users_pb2.User, engine: Engine
) -> Iterator[tuple[orders_pb2.Order, Connection]]:
    """An order whose row another transaction holds locked, so that updating it blocks."""
    order = orders.CreateOrder(
        orders_pb2.CreateOrderRequest(
            user_id=user.id, amount=money_pb2.Money(currency_code="USD", units=3)
        )
    )
    with engine.connect() as blocker:
        blocker.execute(text("SELECT 1 FROM orders WHERE id = :id FOR UPDATE"), {"id": order.id})
        yield order, blocker
        blocker.rollback()


def statements_waiting_on_locks(engine: Engine) -> int:
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'order_service' AND wait_event_type = 'Lock'"
    )
    with engine.connect() as connection:
        return int(connection.scalar(query) or 0)


def test_an_expired_deadline_ends_the_statement_it_bounded(
    orders: orders_pb2_grpc.OrderServiceStub,
    locked_order: tuple[orders_pb2.Order, Connection],
    engine: Engine,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    order, _blocker = locked_order
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as expired:
        settlements.UpdateOrderStatus(
            orders_pb2.UpdateOrderStatusRequest(id=order.id, status=orders_pb2.ORDER_STATUS_FAILED),
            timeout=0.5,
        )
    assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The server's statement was bounded by the same deadline: it is not waiting any more,
    # although the lock is still held.
    assert wait_until(lambda: statements_waiting_on_locks(engine) == 0, timeout=2)
    assert time.monotonic() - started < 3
    assert orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id)).status == (
        orders_pb2.ORDER_STATUS_CREATED
    )


def test_a_cancelled_call_has_its_statement_cancelled(
    orders: orders_pb2_grpc.OrderServiceStub,
    locked_order: tuple[orders_pb2.Order, Connection],
    engine: Engine,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    order, _blocker = locked_order
    call = settlements.UpdateOrderStatus.future(
        orders_pb2.UpdateOrderStatusRequest(id=order.id, status=orders_pb2.ORDER_STATUS_FAILED)
    )  # no deadline: only the cancellation can end the server's wait
    assert wait_until(lambda: statements_waiting_on_locks(engine) == 1, timeout=5)

    call.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs

    assert wait_until(lambda: statements_waiting_on_locks(engine) == 0, timeout=5)
    assert orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id)).status == (
        orders_pb2.ORDER_STATUS_CREATED
    )
    # The pool discards the cancelled connection: later calls are served normally.
    for _ in range(20):
        orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id), timeout=5)


def test_calls_past_the_concurrency_limit_are_refused_at_once(
    locked_order: tuple[orders_pb2.Order, Connection], engine: Engine
) -> None:
    order, blocker = locked_order
    running = start_service(
        ORDER_SERVICE, service_settings("order_service", GRPC_MAX_CONCURRENT_RPCS="2")
    )
    try:
        # The processor's certificate (to settle) with an admin's token (to read).
        address = f"127.0.0.1:{running.port}"
        with credentials.channel(address, "processor", bearer=credentials.token()) as channel:
            stub = orders_pb2_grpc.OrderServiceStub(channel)
            change = orders_pb2.UpdateOrderStatusRequest(
                id=order.id, status=orders_pb2.ORDER_STATUS_FAILED
            )
            held = [stub.UpdateOrderStatus.future(change, timeout=30) for _ in range(2)]
            assert wait_until(lambda: statements_waiting_on_locks(engine) >= 1, timeout=5)

            with pytest.raises(grpc.RpcError) as refused:
                stub.GetOrder(orders_pb2.GetOrderRequest(id=order.id), timeout=5)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

            blocker.rollback()  # the held calls finish, and the server takes calls again
            assert {call.result().status for call in held} == {orders_pb2.ORDER_STATUS_FAILED}
            assert stub.GetOrder(orders_pb2.GetOrderRequest(id=order.id), timeout=5).id == order.id
    finally:
        running.stop(grace_seconds=1)
