"""EcommerceClient against small real servers of its own on loopback: gRPC's retries of
UNAVAILABLE with one request_id across attempts, deadlines, the token on every call."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import grpc
import pytest
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc

from ecommerce_client import CallFailed, EcommerceClient, retry_service_config
from ecommerce_client.client import channel_options
from ecommerce_client.money import amount_to_money, money_to_text, parse_amount
from servicekit.settings import TlsSettings

PLAINTEXT = TlsSettings("client", ca_file="", cert_file="", key_file="", insecure=True)


def authorization(context: grpc.ServicerContext) -> str:
    return str(dict(context.invocation_metadata())["authorization"])


class FlakyUsers(users_pb2_grpc.UserServiceServicer):
    """Answers UNAVAILABLE `failures` times, then creates; remembers what each attempt sent."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.request_ids: list[str] = []
        self.authorization: list[str] = []

    def CreateUser(
        self, request: users_pb2.CreateUserRequest, context: grpc.ServicerContext
    ) -> users_pb2.User:
        self.request_ids.append(request.request_id)
        self.authorization.append(authorization(context))
        if len(self.request_ids) <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return users_pb2.User(id=str(uuid.uuid4()), email=request.email, name=request.name)

    def GetUser(
        self, request: users_pb2.GetUserRequest, context: grpc.ServicerContext
    ) -> users_pb2.User:
        time.sleep(2)  # longer than the client's deadline
        return users_pb2.User(id=request.id)


class DeadlineEcho(orders_pb2_grpc.OrderServiceServicer):
    """Answers with the seconds left before each call's deadline, in status_reason (without a
    deadline: gRPC's infinite future, years away)."""

    def __init__(self) -> None:
        self.authorization: list[str] = []

    def _echo(self, context: grpc.ServicerContext) -> orders_pb2.Order:
        self.authorization.append(authorization(context))
        return orders_pb2.Order(status_reason=str(context.time_remaining()))

    def GetOrder(
        self, request: orders_pb2.GetOrderRequest, context: grpc.ServicerContext
    ) -> orders_pb2.Order:
        return self._echo(context)

    def WatchOrder(
        self, request: orders_pb2.WatchOrderRequest, context: grpc.ServicerContext
    ) -> Iterator[orders_pb2.Order]:
        yield self._echo(context)

    def CreateOrder(
        self, request: orders_pb2.CreateOrderRequest, context: grpc.ServicerContext
    ) -> orders_pb2.Order:
        return orders_pb2.Order(user_id=request.user_id, amount=request.amount)


@contextmanager
def serving(users: Any, orders: Any) -> Iterator[str]:
    """Both servicers on one plaintext loopback port; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    users_pb2_grpc.add_UserServiceServicer_to_server(users, server)
    orders_pb2_grpc.add_OrderServiceServicer_to_server(orders, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def flaky() -> FlakyUsers:
    # The stubs mark every method abstract; the generated base answers UNIMPLEMENTED for the rest.
    return FlakyUsers(failures=2)  # type: ignore[abstract]


@pytest.fixture
def echo() -> DeadlineEcho:
    return DeadlineEcho()  # type: ignore[abstract]  # as FlakyUsers


@pytest.fixture
def address(flaky: FlakyUsers, echo: DeadlineEcho) -> Iterator[str]:
    with serving(flaky, echo) as address:
        yield address


@pytest.fixture
def client(address: str) -> Iterator[EcommerceClient]:
    with EcommerceClient(address, address, PLAINTEXT, "the-token", deadline_seconds=1.0) as client:
        yield client


def test_the_service_config_retries_unavailable_on_both_services() -> None:
    options = dict(channel_options())
    (method,) = json.loads(options["grpc.service_config"])["methodConfig"]

    assert options["grpc.enable_retries"] == 1
    assert method["name"] == [
        {"service": "ecommerce.v1.UserService"},
        {"service": "ecommerce.v1.OrderService"},
    ]
    assert method["retryPolicy"] == {
        "maxAttempts": 5,
        "initialBackoff": "0.1s",
        "maxBackoff": "2.0s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    assert retry_service_config() == json.loads(options["grpc.service_config"])


def test_a_create_is_retried_on_unavailable_with_one_fresh_request_id(
    client: EcommerceClient, flaky: FlakyUsers
) -> None:
    user = client.create_user("ada@example.com", "Ada")

    assert user.email == "ada@example.com"
    assert len(flaky.request_ids) == 3  # two UNAVAILABLE, then the answer
    assert len(set(flaky.request_ids)) == 1
    uuid.UUID(flaky.request_ids[0])
    assert flaky.authorization == ["Bearer the-token"] * 3


def test_each_create_gets_its_own_request_id_unless_given_one(
    client: EcommerceClient, flaky: FlakyUsers
) -> None:
    flaky.failures = 0
    given = str(uuid.uuid4())

    client.create_user("a@example.com", "A")
    client.create_user("b@example.com", "B")
    client.create_user("c@example.com", "C", request_id=given)

    first, second, third = flaky.request_ids
    assert first != second and third == given


def test_retries_end_after_max_attempts_with_the_last_status(
    address: str, flaky: FlakyUsers
) -> None:
    flaky.failures = 100
    quick = retry_service_config(initial_backoff_seconds=0.01, max_backoff_seconds=0.05)

    with (
        EcommerceClient(address, address, PLAINTEXT, "t", service_config=quick) as client,
        pytest.raises(CallFailed) as raised,
    ):
        client.create_user("ada@example.com", "Ada")

    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert raised.value.failure.message == "restarting"
    assert len(flaky.request_ids) == 5


def test_unary_calls_have_the_default_deadline_and_a_watch_none(
    client: EcommerceClient, echo: DeadlineEcho
) -> None:
    remaining = float(client.get_order(str(uuid.uuid4())).status_reason)
    (watched,) = client.watch_order(str(uuid.uuid4()))
    (bounded,) = client.watch_order(str(uuid.uuid4()), timeout=30)

    assert 0 < remaining <= 1.5  # the server's clock reads the deadline, give or take
    assert float(watched.status_reason) > 365 * 86400
    assert 1.5 < float(bounded.status_reason) <= 31
    assert echo.authorization == ["Bearer the-token"] * 3  # on the stream too


def test_a_call_past_its_deadline_fails_with_deadline_exceeded(client: EcommerceClient) -> None:
    with pytest.raises(CallFailed) as raised:
        client.get_user(str(uuid.uuid4()))

    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert raised.value.method == "GetUser"


def test_amounts_are_sent_exactly_and_never_as_floats(client: EcommerceClient) -> None:
    order = client.create_order("u", Decimal("19.99"), "USD")

    assert (order.amount.units, order.amount.nanos) == (19, 990_000_000)
    with pytest.raises(TypeError):
        client.create_order("u", 19.99, "USD")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "units", "nanos", "back"),
    [
        ("19.99", 19, 990_000_000, "19.99"),
        ("1000", 1000, 0, "1000"),
        ("0.000000001", 0, 1, "0.000000001"),
        ("-2.50", -2, -500_000_000, "-2.5"),
        ("1.50000000000", 1, 500_000_000, "1.5"),  # trailing zeros are not places
        ("0", 0, 0, "0"),
    ],
)
def test_decimal_strings_to_money_and_back(text: str, units: int, nanos: int, back: str) -> None:
    money = amount_to_money(parse_amount(text), "USD")

    assert (money.units, money.nanos, money.currency_code) == (units, nanos, "USD")
    assert money_to_text(money) == back


@pytest.mark.parametrize("text", ["abc", "NaN", "-Infinity", "1.0000000001", ""])
def test_what_money_cannot_carry_exactly_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        amount_to_money(parse_amount(text), "USD")
