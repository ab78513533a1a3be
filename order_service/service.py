"""OrderService's domain logic."""

from __future__ import annotations

import logging
import uuid
from decimal import Decimal

import grpc
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from order_service.status import (
    CREATED,
    OrderStatus,
    order_status_transition,
    parse_requested_status,
    status_from_column,
    status_to_column,
)
from servicekit.db import transaction, violated_constraint
from servicekit.errors import InvalidArgument, NotFound
from servicekit.fields import check_printable, parse_id, parse_request_id, to_timestamp
from servicekit.idempotency import create_once
from servicekit.models import OrderRecord, OrderStatusChangeRecord
from servicekit.money import decimal_to_money, money_to_decimal
from servicekit.outbox import Event, new_event_id, stage_event
from servicekit.pagination import fetch_page
from servicekit.server import ServiceDefinition, ServiceResources

log = logging.getLogger("order_service")

MAX_REASON_LENGTH = 1000


def order_message(record: OrderRecord) -> orders_pb2.Order:
    return orders_pb2.Order(
        id=str(record.id),
        user_id=str(record.user_id),
        amount=decimal_to_money(record.amount, record.currency_code),
        status=status_from_column(record.status),
        status_reason=record.status_reason,
        create_time=to_timestamp(record.create_time),
        update_time=to_timestamp(record.update_time),
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
        self._sessions = resources.sessions
        self._orders_topic = resources.settings.kafka.orders_topic
        self._event_source = resources.event_source

    def _stage(self, session: Session, user_id: str, event: Event) -> None:
        # Keyed by user: all of one user's order events land in one partition, in order.
        stage_event(
            session, topic=self._orders_topic, key=user_id, source=self._event_source, event=event
        )

    def _announce_created(self, session: Session, record: OrderRecord) -> None:
        order = order_message(record)
        event = events_pb2.OrderCreated(
            event_id=new_event_id(), order=order, occur_time=order.create_time
        )
        self._stage(session, order.user_id, event)

    def _record_status_change(
        self, session: Session, record: OrderRecord, previous: OrderStatus
    ) -> None:
        """The history row and the OrderStatusChanged event, in the transaction of the change."""
        session.flush()  # the database sets update_time
        event = events_pb2.OrderStatusChanged(
            event_id=new_event_id(),
            order_id=str(record.id),
            user_id=str(record.user_id),
            old_status=previous,
            new_status=status_from_column(record.status),
            reason=record.status_reason,
            occur_time=to_timestamp(record.update_time),
        )
        session.add(
            OrderStatusChangeRecord(
                order_id=record.id,
                old_status=status_to_column(previous),
                new_status=record.status,
                reason=record.status_reason,
                event_id=uuid.UUID(event.event_id),
                change_time=record.update_time,
            )
        )
        self._stage(session, event.user_id, event)

    def CreateOrder(
        self, request: orders_pb2.CreateOrderRequest, context: grpc.ServicerContext
    ) -> orders_pb2.Order:
        user_id = parse_id(request.user_id, "user_id")
        amount = _positive_amount(request)
        currency_code = request.amount.currency_code
        request_id = parse_request_id(request.request_id)
        new_order = OrderRecord(
            user_id=user_id,
            amount=amount,
            currency_code=currency_code,
            status=status_to_column(CREATED),
            request_id=request_id,
        )
        try:
            record = create_once(
                self._sessions,
                new_order,
                same_request=lambda earlier: (
                    (earlier.user_id, earlier.amount, earlier.currency_code)
                    == (user_id, amount, currency_code)
                ),
                in_same_transaction=self._announce_created,
            )
        except IntegrityError as error:
            if violated_constraint(error) == "orders_user_id_fkey":
                raise NotFound(f"user {user_id} does not exist", reason="USER_NOT_FOUND") from None
            raise
        log.info("order created", extra={"fields": {"order_id": str(record.id)}})
        return order_message(record)

    def GetOrder(
        self, request: orders_pb2.GetOrderRequest, context: grpc.ServicerContext
    ) -> orders_pb2.Order:
        order_id = parse_id(request.id)
        with self._sessions() as session:
            record = session.get(OrderRecord, order_id)
        if record is None:
            raise NotFound(f"order {order_id} does not exist", reason="ORDER_NOT_FOUND")
        return order_message(record)

    def ListOrders(
        self, request: orders_pb2.ListOrdersRequest, context: grpc.ServicerContext
    ) -> orders_pb2.ListOrdersResponse:
        query = select(OrderRecord)
        if request.user_id:
            query = query.where(OrderRecord.user_id == parse_id(request.user_id, "user_id"))
        with self._sessions() as session:
            records, next_page_token = fetch_page(
                session,
                query,
                (OrderRecord.create_time, OrderRecord.id),
                request.page_size,
                request.page_token,
                list_filter=f"user_id={request.user_id}",
            )
        return orders_pb2.ListOrdersResponse(
            orders=[order_message(record) for record in records], next_page_token=next_page_token
        )

    def UpdateOrderStatus(
        self, request: orders_pb2.UpdateOrderStatusRequest, context: grpc.ServicerContext
    ) -> orders_pb2.Order:
        order_id = parse_id(request.id)
        requested = parse_requested_status(request.status)
        reason = check_printable(request.reason.strip(), "reason", allow_line_breaks=True)
        if len(reason) > MAX_REASON_LENGTH:
            raise InvalidArgument("reason", f"must be at most {MAX_REASON_LENGTH} characters")
        with transaction(self._sessions) as session:
            # The row lock serialises concurrent updates of one order, so exactly one wins.
            record = session.get(OrderRecord, order_id, with_for_update=True)
            if record is None:
                raise NotFound(f"order {order_id} does not exist", reason="ORDER_NOT_FOUND")
            previous = status_from_column(record.status)
            if order_status_transition(previous, requested):
                record.status = status_to_column(requested)
                record.status_reason = reason
                record.update_time = func.now()  # the database's clock
                self._record_status_change(session, record, previous)
                log.info(
                    "order status changed",
                    extra={
                        "fields": {
                            "order_id": str(order_id),
                            "from": status_to_column(previous),
                            "to": record.status,
                        }
                    },
                )
        return order_message(record)


DEFINITION = ServiceDefinition(
    full_name=orders_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name,
    register=lambda server, resources: orders_pb2_grpc.add_OrderServiceServicer_to_server(
        OrderServicer(resources), server
    ),
)
