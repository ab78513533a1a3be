"""The order lifecycle: CREATED -> PROCESSED | FAILED (the processor settles it) or CANCELLED (its
owner cancels it first), and nothing else."""

from __future__ import annotations

from typing import TypeAlias

from ecommerce.v1 import orders_pb2

from servicekit.errors import FailedPrecondition, InvalidArgument

OrderStatus: TypeAlias = orders_pb2.OrderStatus.ValueType

CREATED = orders_pb2.ORDER_STATUS_CREATED
PROCESSED = orders_pb2.ORDER_STATUS_PROCESSED
FAILED = orders_pb2.ORDER_STATUS_FAILED
CANCELLED = orders_pb2.ORDER_STATUS_CANCELLED

_ALLOWED_TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    CREATED: frozenset({PROCESSED, FAILED, CANCELLED}),
    PROCESSED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}
FINAL_STATUSES = frozenset(status for status, next in _ALLOWED_TRANSITIONS.items() if not next)
STATUSES = frozenset(_ALLOWED_TRANSITIONS)
# What UpdateOrderStatus may set: cancelling is CancelOrder's, for the order's owner.
_SETTLEMENTS = frozenset({CREATED, PROCESSED, FAILED})
_PREFIX = "ORDER_STATUS_"


def status_from_column(stored: str) -> OrderStatus:
    return orders_pb2.OrderStatus.Value(_PREFIX + stored)


def status_to_column(status: OrderStatus) -> str:
    return orders_pb2.OrderStatus.Name(status).removeprefix(_PREFIX)


def parse_requested_status(value: int) -> OrderStatus:
    if value not in _SETTLEMENTS:
        raise InvalidArgument(
            "status",
            "must be ORDER_STATUS_CREATED, ORDER_STATUS_PROCESSED or ORDER_STATUS_FAILED",
        )
    return OrderStatus(value)


def order_status_transition(current: OrderStatus, requested: OrderStatus) -> bool:
    """True when the order must change; False for the idempotent no-op of setting the same status.

    Raises FailedPrecondition for a transition the lifecycle does not allow.
    """
    if requested == current:
        return False
    if requested not in _ALLOWED_TRANSITIONS[current]:
        raise FailedPrecondition(
            f"an order in {orders_pb2.OrderStatus.Name(current)} cannot move to "
            f"{orders_pb2.OrderStatus.Name(requested)}",
            reason="ORDER_STATUS_TRANSITION_NOT_ALLOWED",
        )
    return True
