"""Status changes of many orders at once: one read, then one guarded statement and one commit
that writes every change, its history row and its OrderStatusChanged event.

Optimistic: a change applies only if the order is still in the status it was read in, so of
concurrent changes exactly one wins, without a transaction held open across round trips; a change
that lost its race is read and decided again.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

from ecommerce.events.v1 import events_pb2

from order_service.status import (
    OrderStatus,
    order_status_transition,
    status_from_column,
    status_to_column,
)
from servicekit.errors import Aborted, FailedPrecondition, NotFound, ServiceError
from servicekit.fields import to_timestamp
from servicekit.outbox import StagedEvent, new_event_id, stage_events_of, staged_params, wake_up
from servicekit.sql import Database, Statement

# Attempts at a change while concurrent changes keep winning (with this lifecycle the second
# attempt always decides: the winner left the order in a final status).
MAX_CHANGE_ATTEMPTS = 3


class OrderRow(NamedTuple):
    """An `orders` row, as the statements select it."""

    id: uuid.UUID
    user_id: uuid.UUID
    amount: Decimal
    currency_code: str
    status: str
    status_reason: str
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class StatusChange:
    """A validated request to move an order to a status."""

    order_id: uuid.UUID
    status: OrderStatus
    reason: str


@dataclass(frozen=True)
class _Write:
    index: int
    changed: OrderRow
    event: events_pb2.OrderStatusChanged


Outcome = OrderRow | ServiceError


@dataclass(frozen=True)
class Applied:
    outcomes: list[Outcome]  # one per change, in order
    changed: list[OrderRow]  # the orders this call changed (not those that had the status)


SELECT_ORDERS = Statement(
    f"SELECT {', '.join(OrderRow._fields)} FROM orders WHERE id = ANY(%(ids)s::uuid[])"
)
WRITE_CHANGES = Statement(
    f"""
WITH change AS (
    SELECT * FROM unnest(%(ids)s::uuid[], %(old_statuses)s::text[], %(statuses)s::text[],
                         %(reasons)s::text[], %(times)s::timestamptz[], %(event_ids)s::uuid[])
        AS change(order_id, old_status, new_status, reason, change_time, event_id)
), changed AS (
    UPDATE orders SET status = change.new_status, status_reason = change.reason,
                      update_time = change.change_time
    FROM change WHERE orders.id = change.order_id AND orders.status = change.old_status
    RETURNING change.*
), history AS (
    INSERT INTO order_status_changes
        (order_id, old_status, new_status, reason, event_id, change_time)
    SELECT order_id, old_status, new_status, reason, event_id, change_time FROM changed
) {stage_events_of("changed")}"""
)


class OrderStatusChanges:
    def __init__(self, database: Database, orders_topic: str, event_source: str) -> None:
        self._database = database
        self._orders_topic = orders_topic
        self._event_source = event_source

    def apply(self, changes: Sequence[StatusChange]) -> Applied:
        """Each change's outcome, in order: the order as it is after it (changed, or unchanged
        when it already had the status), or the error that kept it from applying. The orders
        must be distinct."""
        outcomes: list[Outcome | None] = [None] * len(changes)
        changed: list[OrderRow] = []
        pending = list(range(len(changes)))
        for _attempt in range(MAX_CHANGE_ATTEMPTS):
            writes = self._decide(changes, pending, outcomes)
            written = self._write(writes) if writes else set()
            pending = []
            for write in writes:
                if uuid.UUID(write.event.event_id) in written:
                    outcomes[write.index] = write.changed
                    changed.append(write.changed)
                else:
                    pending.append(write.index)  # a concurrent change won: decide again
            if not pending:
                break
        for index in pending:
            outcomes[index] = Aborted(
                f"order {changes[index].order_id} kept changing concurrently; retry",
                reason="CONCURRENT_CHANGE",
            )
        return Applied([outcome for outcome in outcomes if outcome is not None], changed)

    def _decide(
        self, changes: Sequence[StatusChange], pending: list[int], outcomes: list[Outcome | None]
    ) -> list[_Write]:
        """Reads the pending orders; settles the outcome of those that need no write."""
        current = self._read([changes[index].order_id for index in pending])
        writes = []
        for index in pending:
            change = changes[index]
            row = current.get(change.order_id)
            if row is None:
                outcomes[index] = NotFound(
                    f"order {change.order_id} does not exist", reason="ORDER_NOT_FOUND"
                )
                continue
            try:
                must_change = order_status_transition(status_from_column(row.status), change.status)
            except FailedPrecondition as refused:
                outcomes[index] = refused
                continue
            if must_change:
                writes.append(self._planned(index, row, change))
            else:
                outcomes[index] = row  # setting the status it has: a no-op
        return writes

    def _read(self, order_ids: list[uuid.UUID]) -> dict[uuid.UUID, OrderRow]:
        rows = self._database.fetch_all(SELECT_ORDERS, {"ids": order_ids})
        return {row.id: row for row in map(OrderRow._make, rows)}

    @staticmethod
    def _planned(index: int, current: OrderRow, change: StatusChange) -> _Write:
        changed = current._replace(
            status=status_to_column(change.status),
            status_reason=change.reason,
            update_time=max(datetime.now(UTC), current.create_time),
        )
        event = events_pb2.OrderStatusChanged(
            event_id=new_event_id(),
            order_id=str(changed.id),
            user_id=str(changed.user_id),
            old_status=status_from_column(current.status),
            new_status=change.status,
            reason=changed.status_reason,
            occur_time=to_timestamp(changed.update_time),
        )
        return _Write(index, changed, event)

    def _write(self, writes: list[_Write]) -> set[uuid.UUID]:
        """Writes the changes whose order is still as read; returns their event ids."""
        # Keyed by user: all of one user's order events land in one partition, in order.
        staged = [
            StagedEvent(self._orders_topic, str(w.changed.user_id), self._event_source, w.event)
            for w in writes
        ]
        params = {
            "ids": [w.changed.id for w in writes],
            "old_statuses": [status_to_column(w.event.old_status) for w in writes],
            "statuses": [w.changed.status for w in writes],
            "reasons": [w.changed.status_reason for w in writes],
            "times": [w.changed.update_time for w in writes],
            "event_ids": [uuid.UUID(w.event.event_id) for w in writes],
            **staged_params(staged),
        }
        written = {event_id for (event_id,) in self._database.fetch_all(WRITE_CHANGES, params)}
        if written:
            wake_up.events_staged()
        return written
