"""OrderService over gRPC, against the real database."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import grpc
import pytest
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2
from google.type import money_pb2
from sqlalchemy import Engine, func, select

from dbschema.tables import OrderRecord
from order_service.status import OrderStatus
from tests.rpc_errors import call_fails

CREATED = orders_pb2.ORDER_STATUS_CREATED
PROCESSED = orders_pb2.ORDER_STATUS_PROCESSED
FAILED = orders_pb2.ORDER_STATUS_FAILED


def usd(units: int, nanos: int = 0, currency_code: str = "USD") -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency_code, units=units, nanos=nanos)


def place(
    stub: orders_pb2_grpc.OrderServiceStub,
    user_id: str,
    amount: money_pb2.Money,
    request_id: str = "",
) -> orders_pb2.Order:
    order: orders_pb2.Order = stub.CreateOrder(
        orders_pb2.CreateOrderRequest(user_id=user_id, amount=amount, request_id=request_id)
    )
    return order


def count_orders(engine: Engine, **where: object) -> int:
    query = select(func.count()).select_from(OrderRecord).filter_by(**where)
    with engine.connect() as connection:
        return int(connection.scalar(query) or 0)


def test_create_order_stores_exact_money_in_created(
    orders: orders_pb2_grpc.OrderServiceStub, user: users_pb2.User, engine: Engine
) -> None:
    order = place(orders, user.id, usd(19, 990_000_000))

    assert uuid.UUID(order.id)
    assert order.user_id == user.id
    assert order.amount == usd(19, 990_000_000)
    assert order.status == CREATED
    assert order.create_time == order.update_time
    assert orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id)) == order
    with engine.connect() as connection:
        stored = connection.scalar(select(OrderRecord.amount).filter_by(id=uuid.UUID(order.id)))
    assert stored == Decimal("19.99")


def test_smallest_and_largest_amounts_round_trip(
    orders: orders_pb2_grpc.OrderServiceStub, user: users_pb2.User
) -> None:
    for amount in (usd(0, 1), usd(9_223_372_036_854_775_807, 999_999_999)):
        assert place(orders, user.id, amount).amount == amount


def test_order_for_unknown_user_is_not_found_and_writes_nothing(
    orders: orders_pb2_grpc.OrderServiceStub, engine: Engine
) -> None:
    stranger = str(uuid.uuid4())
    failure = call_fails(
        orders.CreateOrder, orders_pb2.CreateOrderRequest(user_id=stranger, amount=usd(5))
    )
    assert failure.code is grpc.StatusCode.NOT_FOUND
    assert failure.reason == "USER_NOT_FOUND"
    assert count_orders(engine, user_id=uuid.UUID(stranger)) == 0


@pytest.mark.parametrize(
    ("amount", "field"),
    [
        (None, "amount"),
        (usd(0), "amount"),
        (usd(-5), "amount"),
        (usd(0, -1), "amount"),
        (usd(1, 1_000_000_000), "amount.nanos"),
        (usd(0, -1_000_000_000), "amount.nanos"),
        (usd(1, -5), "amount.nanos"),
        (usd(-1, 5), "amount.nanos"),
        (usd(5, currency_code=""), "amount.currency_code"),
        (usd(5, currency_code="usd"), "amount.currency_code"),
        (usd(5, currency_code="US"), "amount.currency_code"),
        (usd(5, currency_code="USDX"), "amount.currency_code"),
        (usd(5, currency_code="€€€"), "amount.currency_code"),
    ],
)
def test_bad_amount_is_invalid_argument_naming_the_field(
    orders: orders_pb2_grpc.OrderServiceStub,
    user: users_pb2.User,
    engine: Engine,
    amount: money_pb2.Money | None,
    field: str,
) -> None:
    failure = call_fails(
        orders.CreateOrder, orders_pb2.CreateOrderRequest(user_id=user.id, amount=amount)
    )
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.field_violations) == [field]
    assert count_orders(engine, user_id=uuid.UUID(user.id)) == 0


@pytest.mark.parametrize("user_id", ["", "abc", str(uuid.uuid4())[:-1]])
def test_malformed_user_id_is_invalid_argument(
    orders: orders_pb2_grpc.OrderServiceStub, user_id: str
) -> None:
    failure = call_fails(
        orders.CreateOrder, orders_pb2.CreateOrderRequest(user_id=user_id, amount=usd(1))
    )
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.field_violations) == ["user_id"]


def test_retry_with_same_request_id_returns_the_first_order(
    orders: orders_pb2_grpc.OrderServiceStub, user: users_pb2.User, engine: Engine
) -> None:
    request_id = str(uuid.uuid4())
    first = place(orders, user.id, usd(10), request_id)
    second = place(orders, user.id, usd(10), request_id)

    assert second == first
    assert count_orders(engine, user_id=uuid.UUID(user.id)) == 1

    failure = call_fails(
        orders.CreateOrder,
        orders_pb2.CreateOrderRequest(user_id=user.id, amount=usd(11), request_id=request_id),
    )
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "REQUEST_ID_REUSED"
    assert count_orders(engine, user_id=uuid.UUID(user.id)) == 1


def test_concurrent_retries_create_one_order(
    orders: orders_pb2_grpc.OrderServiceStub, user: users_pb2.User, engine: Engine
) -> None:
    request = orders_pb2.CreateOrderRequest(
        user_id=user.id, amount=usd(3, 500_000_000), request_id=str(uuid.uuid4())
    )
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda _: orders.CreateOrder(request), range(12)))

    assert len({order.id for order in results}) == 1
    assert count_orders(engine, user_id=uuid.UUID(user.id)) == 1


def test_get_unknown_or_malformed_order(orders: orders_pb2_grpc.OrderServiceStub) -> None:
    missing = call_fails(orders.GetOrder, orders_pb2.GetOrderRequest(id=str(uuid.uuid4())))
    assert missing.code is grpc.StatusCode.NOT_FOUND
    assert missing.reason == "ORDER_NOT_FOUND"

    malformed = call_fails(orders.GetOrder, orders_pb2.GetOrderRequest(id="order-1"))
    assert malformed.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(malformed.field_violations) == ["id"]


def test_list_orders_of_one_user_across_inserts(
    orders: orders_pb2_grpc.OrderServiceStub, user: users_pb2.User
) -> None:
    placed = [place(orders, user.id, usd(n)).id for n in range(1, 6)]
    seen: list[str] = []
    token = ""
    while True:
        page = orders.ListOrders(
            orders_pb2.ListOrdersRequest(user_id=user.id, page_size=2, page_token=token)
        )
        seen.extend(order.id for order in page.orders)
        token = page.next_page_token
        if not token:
            break
        placed.append(place(orders, user.id, usd(100)).id)  # an insert between pages

    assert seen == placed  # oldest first, each exactly once, late inserts included at the end
    assert all(
        order.user_id == user.id
        for order in orders.ListOrders(orders_pb2.ListOrdersRequest(user_id=user.id)).orders
    )


def test_list_orders_token_is_tied_to_its_filter(
    orders: orders_pb2_grpc.OrderServiceStub, user: users_pb2.User
) -> None:
    for units in (1, 2, 3):
        place(orders, user.id, usd(units))
    page = orders.ListOrders(orders_pb2.ListOrdersRequest(user_id=user.id, page_size=1))
    assert page.next_page_token

    for other_filter in ("", str(uuid.uuid4())):
        failure = call_fails(
            orders.ListOrders,
            orders_pb2.ListOrdersRequest(user_id=other_filter, page_token=page.next_page_token),
        )
        assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
        assert list(failure.field_violations) == ["page_token"]


def test_list_orders_rejects_bad_page_size_and_user_id(
    orders: orders_pb2_grpc.OrderServiceStub,
) -> None:
    negative = call_fails(orders.ListOrders, orders_pb2.ListOrdersRequest(page_size=-10))
    assert list(negative.field_violations) == ["page_size"]
    bad_user = call_fails(orders.ListOrders, orders_pb2.ListOrdersRequest(user_id="me"))
    assert list(bad_user.field_violations) == ["user_id"]


@pytest.mark.parametrize("outcome", [PROCESSED, FAILED])
def test_created_order_moves_to_a_terminal_status_once(
    orders: orders_pb2_grpc.OrderServiceStub,
    user: users_pb2.User,
    outcome: OrderStatus,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    order = place(orders, user.id, usd(7))
    request = orders_pb2.UpdateOrderStatusRequest(id=order.id, status=outcome, reason="checked")

    updated = settlements.UpdateOrderStatus(request)
    assert updated.status == outcome
    assert updated.status_reason == "checked"
    assert updated.update_time.ToDatetime() >= order.update_time.ToDatetime()

    # Setting the status it already has is a no-op that returns the order unchanged.
    assert settlements.UpdateOrderStatus(request) == updated
    retried = orders_pb2.UpdateOrderStatusRequest(id=order.id, status=outcome, reason="again")
    assert settlements.UpdateOrderStatus(retried) == updated


@pytest.mark.parametrize(
    ("first", "then"), [(PROCESSED, FAILED), (FAILED, PROCESSED), (PROCESSED, CREATED)]
)
def test_transition_out_of_a_terminal_status_is_failed_precondition(
    orders: orders_pb2_grpc.OrderServiceStub,
    user: users_pb2.User,
    first: OrderStatus,
    then: OrderStatus,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    order = place(orders, user.id, usd(7))
    done = settlements.UpdateOrderStatus(
        orders_pb2.UpdateOrderStatusRequest(id=order.id, status=first)
    )

    failure = call_fails(
        settlements.UpdateOrderStatus, orders_pb2.UpdateOrderStatusRequest(id=order.id, status=then)
    )

    assert failure.code is grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "ORDER_STATUS_TRANSITION_NOT_ALLOWED"
    assert orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id)) == done


def test_concurrent_updates_leave_exactly_one_winner(
    orders: orders_pb2_grpc.OrderServiceStub,
    user: users_pb2.User,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    order = place(orders, user.id, usd(7))

    def attempt(status: OrderStatus) -> grpc.StatusCode:
        try:
            settlements.UpdateOrderStatus(
                orders_pb2.UpdateOrderStatusRequest(id=order.id, status=status)
            )
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(attempt, [PROCESSED, FAILED] * 4))

    final = orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id)).status
    assert final in (PROCESSED, FAILED)
    assert codes.count(grpc.StatusCode.OK) == 4  # every request for the winning status succeeds
    assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == 4


@pytest.mark.parametrize(
    ("status", "reason", "field"),
    [
        (orders_pb2.ORDER_STATUS_UNSPECIFIED, "", "status"),
        (OrderStatus(99), "", "status"),
        (PROCESSED, "x" * 1001, "reason"),
    ],
)
def test_bad_update_is_invalid_argument(
    orders: orders_pb2_grpc.OrderServiceStub,
    user: users_pb2.User,
    status: OrderStatus,
    reason: str,
    field: str,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    order = place(orders, user.id, usd(7))
    failure = call_fails(
        settlements.UpdateOrderStatus,
        orders_pb2.UpdateOrderStatusRequest(id=order.id, status=status, reason=reason),
    )
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.field_violations) == [field]
    assert orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id)).status == CREATED


def test_update_of_unknown_order_is_not_found(
    orders: orders_pb2_grpc.OrderServiceStub, settlements: orders_pb2_grpc.OrderServiceStub
) -> None:
    failure = call_fails(
        settlements.UpdateOrderStatus,
        orders_pb2.UpdateOrderStatusRequest(id=str(uuid.uuid4()), status=PROCESSED),
    )
    assert failure.code is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("reason", ["nul \x00 inside", "\x00"])
def test_reason_with_nul_is_invalid_argument_not_a_database_error(
    orders: orders_pb2_grpc.OrderServiceStub,
    user: users_pb2.User,
    reason: str,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    order = place(orders, user.id, usd(7))
    failure = call_fails(
        settlements.UpdateOrderStatus,
        orders_pb2.UpdateOrderStatusRequest(id=order.id, status=PROCESSED, reason=reason),
    )
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.field_violations) == ["reason"]
    assert orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id)).status == CREATED
