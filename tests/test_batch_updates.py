"""BatchUpdateOrderStatus: many changes, one commit, each with the rules of UpdateOrderStatus."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2
from sqlalchemy import Engine, bindparam, create_engine, text

from order_service.status import OrderStatus
from servicekit.settings import with_password
from servicekit.sql import Database, Statement
from tests.rpc_errors import call_fails, failure_of
from tests.test_orders import CREATED, FAILED, PROCESSED, place, usd


def change(
    order_id: str, status: OrderStatus, reason: str = ""
) -> orders_pb2.UpdateOrderStatusRequest:
    return orders_pb2.UpdateOrderStatusRequest(id=order_id, status=status, reason=reason)


def batch(
    stub: orders_pb2_grpc.OrderServiceStub, *changes: orders_pb2.UpdateOrderStatusRequest
) -> list[orders_pb2.OrderStatusUpdateResult]:
    request = orders_pb2.BatchUpdateOrderStatusRequest(requests=changes)
    response: orders_pb2.BatchUpdateOrderStatusResponse = stub.BatchUpdateOrderStatus(request)
    return list(response.results)


def history_rows(engine: Engine, order_ids: list[str]) -> int:
    query = text("SELECT count(*) FROM order_status_changes WHERE order_id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    with engine.connect() as connection:
        return int(connection.scalar(query, {"ids": [uuid.UUID(i) for i in order_ids]}) or 0)


def test_each_change_of_a_batch_gets_its_own_result_in_order(
    orders: orders_pb2_grpc.OrderServiceStub,
    user: users_pb2.User,
    engine: Engine,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    to_process, to_fail, settled, same = (place(orders, user.id, usd(5)).id for _ in range(4))
    unknown = str(uuid.uuid4())
    settlements.UpdateOrderStatus(change(settled, FAILED, "earlier"))
    settlements.UpdateOrderStatus(change(same, PROCESSED, "earlier"))

    results = batch(
        settlements,
        change(to_process, PROCESSED, "accepted"),
        change(to_fail, FAILED, "MAX_ORDER_AMOUNT"),
        change(settled, PROCESSED),
        change(same, PROCESSED, "again"),
        change(unknown, PROCESSED),
        change(to_process, FAILED),
        change(str(uuid.uuid4()), orders_pb2.ORDER_STATUS_UNSPECIFIED),
        change("not-a-uuid", PROCESSED),
    )

    assert [r.WhichOneof("result") for r in results] == ["order"] * 2 + ["error"] + ["order"] + [
        "error"
    ] * 4
    assert (results[0].order.status, results[0].order.status_reason) == (PROCESSED, "accepted")
    assert (results[1].order.status, results[1].order.status_reason) == (FAILED, "MAX_ORDER_AMOUNT")
    assert failure_of(results[2].error).reason == "ORDER_STATUS_TRANSITION_NOT_ALLOWED"
    assert results[3].order.status_reason == "earlier"  # a no-op leaves the order as it was
    assert failure_of(results[4].error).code is grpc.StatusCode.NOT_FOUND
    duplicate, unspecified, malformed = (failure_of(r.error) for r in results[5:])
    assert duplicate.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(duplicate.field_violations) == ["requests[5].id"]
    assert list(unspecified.field_violations) == ["requests[6].status"]
    assert list(malformed.field_violations) == ["requests[7].id"]
    # One history row per applied change, and only for those.
    assert history_rows(engine, [to_process, to_fail]) == 2
    assert history_rows(engine, [settled, same]) == 2  # their earlier changes only
    assert orders.GetOrder(orders_pb2.GetOrderRequest(id=to_process)).status == PROCESSED


def test_a_batch_settles_many_orders_with_one_event_each(
    orders: orders_pb2_grpc.OrderServiceStub,
    user: users_pb2.User,
    engine: Engine,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    placed = [place(orders, user.id, usd(5)).id for _ in range(60)]

    results = batch(settlements, *(change(order_id, PROCESSED, "accepted") for order_id in placed))

    assert [r.order.id for r in results] == placed
    assert {r.order.status for r in results} == {PROCESSED}
    with engine.connect() as connection:
        events = connection.execute(
            text(
                "SELECT count(DISTINCT event_id) FROM order_status_changes WHERE order_id IN :ids"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": [uuid.UUID(i) for i in placed]},
        ).scalar()
    assert events == len(placed)


def test_a_batch_and_single_updates_racing_leave_one_winner_per_order(
    orders: orders_pb2_grpc.OrderServiceStub,
    user: users_pb2.User,
    engine: Engine,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    placed = [place(orders, user.id, usd(5)).id for _ in range(20)]

    def single(order_id: str) -> None:
        try:
            settlements.UpdateOrderStatus(change(order_id, FAILED))
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.FAILED_PRECONDITION

    with ThreadPoolExecutor(max_workers=4) as pool:
        singles = pool.map(single, placed)
        results = batch(settlements, *(change(order_id, PROCESSED) for order_id in placed))
        list(singles)

    for order_id, result in zip(placed, results, strict=True):
        final = orders.GetOrder(orders_pb2.GetOrderRequest(id=order_id)).status
        if result.HasField("order"):
            assert final == PROCESSED
        else:
            assert failure_of(result.error).code is grpc.StatusCode.FAILED_PRECONDITION
            assert final == FAILED
    assert history_rows(engine, placed) == len(placed)


def test_an_empty_or_oversized_batch_is_invalid_argument(
    orders: orders_pb2_grpc.OrderServiceStub,
    user: users_pb2.User,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    order_id = place(orders, user.id, usd(5)).id
    for size in (0, 1001):
        request = orders_pb2.BatchUpdateOrderStatusRequest(
            requests=[change(str(uuid.uuid4()), PROCESSED) for _ in range(size)]
        )
        failure = call_fails(settlements.BatchUpdateOrderStatus, request)
        assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
        assert list(failure.field_violations) == ["requests"]
    assert orders.GetOrder(orders_pb2.GetOrderRequest(id=order_id)).status == CREATED


def test_statements_are_prepared_once_per_connection(database_url: str) -> None:
    engine = create_engine(with_password(database_url), pool_size=1, max_overflow=0)
    database = Database(engine)
    statement = Statement("SELECT %(a)s::int + %(b)s::int, %(a)s::int")
    try:
        assert database.fetch_one(statement, {"a": 1, "b": 2}) == (3, 1)
        assert database.fetch_one(statement, {"a": 5, "b": 5}) == (10, 5)
        prepared = database.fetch_all("SELECT name FROM pg_prepared_statements", {})
    finally:
        engine.dispose()
    assert prepared == [(statement.name,)]
