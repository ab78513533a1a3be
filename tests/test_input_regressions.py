"""Regressions of hostile input found by hand: each once answered INTERNAL, wrote a huge log line
or let hidden characters into stored text."""

from __future__ import annotations

import base64
import logging
import uuid

import grpc
import pytest
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc

from servicekit.jsonlog import JsonFormatter
from tests.conftest import unique_email
from tests.rpc_errors import call_fails
from tests.test_orders import CREATED, PROCESSED, place, usd


@pytest.mark.parametrize("depth", [100, 100_000])
def test_a_deeply_nested_page_token_is_invalid_argument(
    users: users_pb2_grpc.UserServiceStub, depth: int
) -> None:
    token = base64.urlsafe_b64encode(b"[" * depth).decode()
    failure = call_fails(users.ListUsers, users_pb2.ListUsersRequest(page_token=token))
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.field_violations) == ["page_token"]


def test_a_huge_id_is_logged_as_an_excerpt(
    orders: orders_pb2_grpc.OrderServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    huge_id = "x" * 1_000_000
    with caplog.at_level(logging.INFO, logger="servicekit.rpc"):
        failure = call_fails(orders.GetOrder, orders_pb2.GetOrderRequest(id=huge_id))
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    (line,) = [
        JsonFormatter("order_service").format(record)
        for record in caplog.records
        if getattr(record, "fields", {}).get("method", "").endswith("/GetOrder")
    ]
    assert len(line) < 2048
    assert "1000000 characters" in line


@pytest.mark.parametrize(
    "hidden",
    ["\u202e", "\u2066", "\u200b", "\ufeff", "\u0085", "\u009b", "\ue000", "\u00ad"],
)
def test_names_and_reasons_with_hidden_characters_are_invalid_argument(
    users: users_pb2_grpc.UserServiceStub,
    orders: orders_pb2_grpc.OrderServiceStub,
    user: users_pb2.User,
    hidden: str,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    request = users_pb2.CreateUserRequest(email=unique_email(), name=f"Ada{hidden}Lovelace")
    failure = call_fails(users.CreateUser, request)
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.field_violations) == ["name"]
    assert f"U+{ord(hidden):04X}" in failure.message

    order = place(orders, user.id, usd(3))
    change = orders_pb2.UpdateOrderStatusRequest(
        id=order.id, status=PROCESSED, reason=f"paid{hidden}ok"
    )
    failure = call_fails(settlements.UpdateOrderStatus, change)
    assert list(failure.field_violations) == ["reason"]
    assert orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id)).status == CREATED


def test_names_are_stored_in_nfc_and_joiners_are_kept(
    users: users_pb2_grpc.UserServiceStub,
) -> None:
    decomposed = "Rene\u0301 \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # Persian ZWNJ
    created = users.CreateUser(
        users_pb2.CreateUserRequest(
            email=unique_email(), name=decomposed, request_id=str(uuid.uuid4())
        )
    )
    assert created.name == "Ren\u00e9 \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
