"""OrderService's domain logic."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

import grpc
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc
from psycopg2 import IntegrityError

from order_service.status import (
    CREATED,
    OrderStatus,
    order_status_transition,
    parse_requested_status,
    status_from_column,
    status_to_column,
)
from servicekit.call_scope import annotate_log
from servicekit.db import violated_constraint
from servicekit.errors import Aborted, InvalidArgument, NotFound
from servicekit.fields import check_printable, parse_id, parse_request_id, to_timestamp
from servicekit.idempotency import Creation, create_once, insert_once_sql
from servicekit.money import decimal_to_money, money_to_decimal
from servicekit.outbox import Event, event_params, new_event_id, stage_event_after
from servicekit.pagination import ListQuery, fetch_page
from servicekit.server import ServiceDefinition, ServiceResources

MAX_REASON_LENGTH = 1000


class OrderRow(NamedTuple):
    """An `orders` row, as the statements below select it."""

    id: uuid.UUID
    user_id: uuid.UUID
    amount: Decimal
    currency_code: str
    status: str
    status_reason: str
    create_time: datetime
    update_time: datetime


ORDER_COLUMNS = ", ".join(OrderRow._fields)
SELECT_ORDER = f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = %(id)s::uuid"
INSERT_ANNOUNCED_ORDER = insert_once_sql("orders", OrderRow._fields)
# Optimistic: the change applies only if the order is still in the status it was read in, so of
# concurrent changes exactly one wins, without a transaction held open across round trips.
CHANGE_ANNOUNCED_STATUS = f"""
WITH changed AS (
    UPDATE orders SET status = %(status)s, status_reason = %(reason)s, update_time = %(now)s
    WHERE id = %(id)s AND status = %(old_status)s
    RETURNING id
), history AS (
    INSERT INTO order_status_changes
        (order_id, old_status, new_status, reason, event_id, change_time)
    SELECT id, %(old_status)s, %(status)s, %(reason)s, %(event_id)s::uuid, %(now)s FROM changed
) {stage_event_after("changed")}"""
# Attempts of UpdateOrderStatus when concurrent changes keep winning (with this lifecycle the
# second attempt always decides: the winner left the order in a final status).
MAX_CHANGE_ATTEMPTS = 3


def order_message(row: OrderRow) -> orders_pb2.Order:
    return orders_pb2.Order(
        id=str(row.id),
        user_id=str(row.user_id),
        amount=decimal_to_money(row.amount, row.currency_code),
        status=status_from_column(row.status),
        status_reason=row.status_reason,
        create_time=to_timestamp(row.create_time),
        update_time=to_timestamp(row.update_time),
    )


def _positive_amount(request: orders_pb2.CreateOrderRequest) -> Decimal:
    if not request.HasField("amount"):
        raise InvalidArgument("amount", "is required")
    amount = money_to_decimal(request.amount)
    if amount <= 0:
        raise InvalidArgument("amount", f"must be greater than zero, got {amount}")
    return amount


class OrderServicer(orders_pb2_grpc.OrderServiceServicer):
    def __init__(self, resources: ServiceResources) -> None:
        self._database = resources.database
        self._orders_topic = resources.settings.kafka.orders_topic
        self._event_source = resources.event_source

    def _event_params(self, user_id: str, event: Event) -> dict[str, object]:
        # Keyed by user: all of one user's order events land in one partition, in order.
        return event_params(
            topic=self._orders_topic, key=user_id, source=self._event_source, event=event
        )

    def CreateOrder(
        self, request: orders_pb2.CreateOrderRequest, context: grpc.ServicerContext
    ) -> orders_pb2.Order:
        user_id = parse_id(request.user_id, "user_id")
        amount = _positive_amount(request)
        currency_code = request.amount.currency_code
        request_id = parse_request_id(request.request_id)
        now = datetime.now(UTC)
        new_order = OrderRow(
            id=uuid.uuid4(),
            user_id=user_id,
            amount=amount,
            currency_code=currency_code,
            status=status_to_column(CREATED),
            status_reason="",
            create_time=now,
            update_time=now,
        )
        order = order_message(new_order)
        created = events_pb2.OrderCreated(
            event_id=new_event_id(), order=order, occur_time=order.create_time
        )
        creation = Creation(
            table="orders",
            new_row=new_order,
            request_id=request_id,
            event=self._event_params(order.user_id, created),
            same_request=lambda earlier: (
                (earlier.user_id, earlier.amount, earlier.currency_code)
                == (user_id, amount, currency_code)
            ),
        )
        try:
            row = create_once(self._database, creation)
        except IntegrityError as error:
            if violated_constraint(error) == "orders_user_id_fkey":
                raise NotFound(f"user {user_id} does not exist", reason="USER_NOT_FOUND") from None
            raise
        if row is new_order:
            annotate_log(order_id=order.id)
            return order
        return order_message(row)

    def GetOrder(
        self, request: orders_pb2.GetOrderRequest, context: grpc.ServicerContext
    ) -> orders_pb2.Order:
        return order_message(self._read_order(parse_id(request.id)))

    def ListOrders(
        self, request: orders_pb2.ListOrdersRequest, context: grpc.ServicerContext
    ) -> orders_pb2.ListOrdersResponse:
        equal_to = {}
        if request.user_id:
            equal_to["user_id"] = parse_id(request.user_id, "user_id")
        rows, next_page_token = fetch_page(
            self._database,
            ListQuery("orders", OrderRow, ORDER_COLUMNS, equal_to),
            request.page_size,
            request.page_token,
            list_filter=f"user_id={request.user_id}",
        )
        return orders_pb2.ListOrdersResponse(
            orders=[order_message(row) for row in rows], next_page_token=next_page_token
        )

    def UpdateOrderStatus(
        self, request: orders_pb2.UpdateOrderStatusRequest, context: grpc.ServicerContext
    ) -> orders_pb2.Order:
        order_id = parse_id(request.id)
        requested = parse_requested_status(request.status)
        reason = check_printable(request.reason.strip(), "reason", allow_line_breaks=True)
        if len(reason) > MAX_REASON_LENGTH:
            raise InvalidArgument("reason", f"must be at most {MAX_REASON_LENGTH} characters")
        for _attempt in range(MAX_CHANGE_ATTEMPTS):
            current = self._read_order(order_id)
            if not order_status_transition(status_from_column(current.status), requested):
                return order_message(current)
            if (changed := self._change_status(current, requested, reason)) is not None:
                return order_message(changed)
        raise Aborted(
            f"order {order_id} kept changing concurrently; retry", reason="CONCURRENT_CHANGE"
        )

    def _change_status(
        self, current: OrderRow, requested: OrderStatus, reason: str
    ) -> OrderRow | None:
        """Writes the change, its history row and its event; None if a concurrent change won."""
        changed = current._replace(
            status=status_to_column(requested),
            status_reason=reason,
            update_time=max(datetime.now(UTC), current.create_time),
        )
        params = self._change_params(changed, status_from_column(current.status))
        if self._database.fetch_one(CHANGE_ANNOUNCED_STATUS, params) is None:
            return None
        annotate_log(status_from=current.status, status_to=changed.status)
        return changed

    def _read_order(self, order_id: uuid.UUID) -> OrderRow:
        row = self._database.fetch_one(SELECT_ORDER, {"id": order_id})
        if row is None:
            raise NotFound(f"order {order_id} does not exist", reason="ORDER_NOT_FOUND")
        return OrderRow(*row)

    def _change_params(self, changed: OrderRow, previous: OrderStatus) -> dict[str, object]:
        """The history row and the OrderStatusChanged event, written with the change."""
        event = events_pb2.OrderStatusChanged(
            event_id=new_event_id(),
            order_id=str(changed.id),
            user_id=str(changed.user_id),
            old_status=previous,
            new_status=status_from_column(changed.status),
            reason=changed.status_reason,
            occur_time=to_timestamp(changed.update_time),
        )
        return {
            "id": changed.id,
            "status": changed.status,
            "reason": changed.status_reason,
            "now": changed.update_time,
            "old_status": status_to_column(previous),
            **self._event_params(event.user_id, event),
        }


DEFINITION = ServiceDefinition(
    full_name=orders_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name,
    register=lambda server, resources: orders_pb2_grpc.add_OrderServiceServicer_to_server(
        OrderServicer(resources), server
    ),
)
