"""OrderService's domain logic."""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import grpc
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc
from psycopg2 import IntegrityError

from order_service.status import (
    CANCELLED,
    CREATED,
    FINAL_STATUSES,
    parse_requested_status,
    status_from_column,
    status_to_column,
)
from order_service.status_changes import Applied, OrderRow, OrderStatusChanges, StatusChange
from order_service.watch import OrderFeed
from servicekit.access import AccessTable, ForUser, Owner, Workload, check_owner
from servicekit.admission import PipelineDelayShedder
from servicekit.call_scope import annotate_log
from servicekit.db import violated_constraint
from servicekit.errors import InvalidArgument, NotFound, ServiceError
from servicekit.fields import check_printable, parse_id, parse_request_id, to_timestamp
from servicekit.idempotency import Creation, create_once, insert_once
from servicekit.money import decimal_to_money, money_to_decimal
from servicekit.outbox import StagedEvent, new_event_id
from servicekit.pagination import ListQuery, fetch_page
from servicekit.server import ServiceDefinition, ServiceResources
from servicekit.sql import Statement

MAX_REASON_LENGTH = 1000
MAX_BATCH_SIZE = 1000
ORDER_COLUMNS = ", ".join(OrderRow._fields)
SELECT_ORDER = Statement(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = %(id)s::uuid")
INSERT_ANNOUNCED_ORDER = insert_once("orders", OrderRow._fields)


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


def parse_status_change(request: orders_pb2.UpdateOrderStatusRequest) -> StatusChange:
    order_id = parse_id(request.id)
    status = parse_requested_status(request.status)
    return StatusChange(order_id, status, parse_reason(request.reason))


def parse_reason(reason: str) -> str:
    reason = check_printable(reason.strip(), "reason", allow_line_breaks=True)
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidArgument("reason", f"must be at most {MAX_REASON_LENGTH} characters")
    return reason


def with_change(order: orders_pb2.Order, change: events_pb2.OrderStatusChanged) -> orders_pb2.Order:
    """`order` as it is after `change`."""
    changed = orders_pb2.Order()
    changed.CopyFrom(order)
    changed.status = change.new_status
    changed.status_reason = change.reason
    changed.update_time.CopyFrom(change.occur_time)
    return changed


class OrderServicer(orders_pb2_grpc.OrderServiceServicer):
    def __init__(self, resources: ServiceResources) -> None:
        self._database = resources.database
        self._orders_topic = resources.settings.kafka.orders_topic
        self._event_source = resources.event_source
        self._status_changes = OrderStatusChanges(
            self._database, self._orders_topic, self._event_source
        )
        self._shedder = PipelineDelayShedder(resources.settings.backpressure)
        self._workers = resources.workers
        self._feed = OrderFeed(resources.settings.kafka, resources.settings.service_name)
        self._feed.start()
        resources.on_stop.append(self._feed.stop)

    def CreateOrder(
        self, request: orders_pb2.CreateOrderRequest, context: grpc.ServicerContext
    ) -> orders_pb2.Order:
        user_id = parse_id(request.user_id, "user_id")
        amount = _positive_amount(request)
        currency_code = request.amount.currency_code
        request_id = parse_request_id(request.request_id)
        self._shedder.admit()
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
            # Keyed by user: all of one user's order events land in one partition, in order.
            event=StagedEvent(self._orders_topic, order.user_id, self._event_source, created),
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
        return order_message(self._owned_order(parse_id(request.id)))

    async def WatchOrder(
        self, request: orders_pb2.WatchOrderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[orders_pb2.Order]:
        """The order now, then as each status change commits, until its status is final."""
        order_id = parse_id(request.id)
        with self._feed.watch(order_id) as changes:
            loop = asyncio.get_running_loop()
            # The caller and the span go with the read (its context is a copy of this one).
            read = contextvars.copy_context().run
            row = await loop.run_in_executor(self._workers, read, self._owned_order, order_id)
            order = order_message(row)
            yield order
            while order.status not in FINAL_STATUSES:
                change = await changes.get()
                if change.new_status != order.status:  # else: a redelivered event
                    order = with_change(order, change)
                    yield order

    def CancelOrder(
        self, request: orders_pb2.CancelOrderRequest, context: grpc.ServicerContext
    ) -> orders_pb2.Order:
        order_id = parse_id(request.id)
        change = StatusChange(order_id, CANCELLED, parse_reason(request.reason))
        self._owned_order(order_id)
        (outcome,) = self._status_changes.apply([change]).outcomes
        if isinstance(outcome, ServiceError):
            raise outcome
        return order_message(outcome)

    def _owned_order(self, order_id: uuid.UUID) -> OrderRow:
        """The order, if the caller may see it (AIP-211: a missing order is refused the same
        way as another user's, so that ids cannot be probed)."""
        found = self._database.fetch_one(SELECT_ORDER, {"id": order_id})
        row = None if found is None else OrderRow(*found)
        check_owner(None if row is None else str(row.user_id), f"order {order_id}")
        if row is None:
            raise NotFound(f"order {order_id} does not exist", reason="ORDER_NOT_FOUND")
        return row

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
        change = parse_status_change(request)
        (outcome,) = self._apply([change]).outcomes
        if isinstance(outcome, ServiceError):
            raise outcome
        return order_message(outcome)

    def BatchUpdateOrderStatus(
        self, request: orders_pb2.BatchUpdateOrderStatusRequest, context: grpc.ServicerContext
    ) -> orders_pb2.BatchUpdateOrderStatusResponse:
        if not 1 <= len(request.requests) <= MAX_BATCH_SIZE:
            raise InvalidArgument(
                "requests", f"must hold 1 to {MAX_BATCH_SIZE} changes, got {len(request.requests)}"
            )
        outcomes: list[OrderRow | ServiceError | None] = [None] * len(request.requests)
        valid: dict[int, StatusChange] = {}
        seen: set[uuid.UUID] = set()
        for index, item in enumerate(request.requests):
            try:
                change = parse_status_change(item)
                if change.order_id in seen:
                    raise InvalidArgument("id", "names an order changed earlier in this batch")
            except InvalidArgument as invalid:
                outcomes[index] = invalid.within(f"requests[{index}]")
                continue
            seen.add(change.order_id)
            valid[index] = change
        applied = self._apply(list(valid.values()))
        for index, outcome in zip(valid, applied.outcomes, strict=True):
            outcomes[index] = outcome
        annotate_log(batch_size=len(request.requests))
        return orders_pb2.BatchUpdateOrderStatusResponse(
            results=[_update_result(outcome) for outcome in outcomes if outcome is not None]
        )

    def _apply(self, changes: list[StatusChange]) -> Applied:
        applied = self._status_changes.apply(changes) if changes else Applied([], [])
        # How long the orders settled now waited since they were placed: the pipeline's delay.
        self._shedder.observe(
            (row.update_time - row.create_time).total_seconds() for row in applied.changed
        )
        return applied


def _update_result(outcome: OrderRow | ServiceError) -> orders_pb2.OrderStatusUpdateResult:
    if isinstance(outcome, ServiceError):
        return orders_pb2.OrderStatusUpdateResult(error=outcome.to_rpc_status())
    return orders_pb2.OrderStatusUpdateResult(order=order_message(outcome))


# Who may call what: people through their tokens, the processor alone settles orders.
ACCESS: AccessTable = {
    "CreateOrder": ForUser("user_id"),
    "GetOrder": Owner(),
    "WatchOrder": Owner(),
    "CancelOrder": Owner(),
    "ListOrders": ForUser("user_id"),
    "UpdateOrderStatus": Workload("processor"),
    "BatchUpdateOrderStatus": Workload("processor"),
}

DEFINITION = ServiceDefinition(
    full_name=orders_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name,
    register=lambda server, resources: orders_pb2_grpc.add_OrderServiceServicer_to_server(
        OrderServicer(resources), server
    ),
    access=ACCESS,
)
