"""The checker: what the orders and users topics and the database say about every acknowledged
order and every user the suite created, after the system settled.

Per order: exactly one distinct OrderCreated and one distinct OrderStatusChanged (by event id; a
redelivery of the same event id is allowed), the first delivery of OrderCreated before the first
of OrderStatusChanged (one partition per key, so offsets order them), one recorded status
transition, and a status history that never goes back. Per user: one distinct UserCreated."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from ecommerce.events.v1 import events_pb2
from sqlalchemy import Engine, text

from chaos.topics import Record, read_topic
from servicekit.settings import KafkaSettings

ORDER_CREATED = events_pb2.OrderCreated.DESCRIPTOR.full_name
STATUS_CHANGED = events_pb2.OrderStatusChanged.DESCRIPTOR.full_name
USER_CREATED = events_pb2.UserCreated.DESCRIPTOR.full_name
# A status only moves forward: CREATED, then one terminal status.
STATUS_RANK = {"CREATED": 0, "PROCESSED": 1, "FAILED": 1}


@dataclass(frozen=True)
class Effects:
    lost: int  # an order not terminal or missing an event; a user without UserCreated
    duplicated: int  # more than one distinct event of a kind, or more than one transition
    reordered: int  # an order's effects out of order on the topic or in its DB history


@dataclass
class _Delivery:
    """Where each distinct event of a key was first delivered, by kind."""

    first: dict[str, tuple[int, int]]  # event id -> (partition, offset) of its first delivery
    kinds: dict[str, set[str]]  # event type -> distinct event ids


def _by_key(records: Iterable[Record], wanted: set[str]) -> dict[str, _Delivery]:
    """Events of the `wanted` orders or users, grouped by the order (or user) they are about."""
    seen: dict[str, _Delivery] = defaultdict(lambda: _Delivery({}, defaultdict(set)))
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        kind, value = record.header("ce_type"), record.value or b""
        if kind == ORDER_CREATED:
            about = events_pb2.OrderCreated.FromString(value).order.id
        elif kind == STATUS_CHANGED:
            about = events_pb2.OrderStatusChanged.FromString(value).order_id
        elif kind == USER_CREATED:
            about = events_pb2.UserCreated.FromString(value).user.id
        else:
            continue
        event_id = record.header("ce_id") or ""
        if about not in wanted:
            continue
        delivery = seen[about]
        delivery.first.setdefault(event_id, (record.partition, record.offset))
        delivery.kinds[kind].add(event_id)
    return seen


def _out_of_order(delivery: _Delivery) -> bool:
    created = [delivery.first[e] for e in delivery.kinds[ORDER_CREATED]]
    changed = [delivery.first[e] for e in delivery.kinds[STATUS_CHANGED]]
    if not created or not changed:
        return False  # counted as lost
    # Across partitions there is no order at all: that is a reordering too.
    return len({p for p, _ in created + changed}) > 1 or min(changed) < min(created)


def _history_goes_back(changes: list[tuple[str, str]]) -> bool:
    """Whether a status history (old, new) in the order it was recorded ever moves backwards
    or does not continue from where the previous change left the order."""
    current = "CREATED"
    for old, new in changes:
        if old != current or STATUS_RANK[new] <= STATUS_RANK[old]:
            return True
        current = new
    return False


def effects(
    engine: Engine, kafka: KafkaSettings, order_ids: list[str], user_ids: list[str]
) -> Effects:
    wanted_orders, wanted_users = set(order_ids), set(user_ids)
    history: dict[str, list[tuple[str, str]]] = defaultdict(list)
    with engine.connect() as connection:
        for order_id, old, new in connection.execute(
            text(
                "SELECT order_id::text, old_status, new_status FROM order_status_changes"
                " WHERE order_id = ANY(CAST(:ids AS uuid[])) ORDER BY id"
            ),
            {"ids": order_ids},
        ):
            history[order_id].append((old, new))
        terminal = {
            row[0]
            for row in connection.execute(
                text(
                    "SELECT id::text FROM orders WHERE id = ANY(CAST(:ids AS uuid[]))"
                    " AND status <> 'CREATED'"
                ),
                {"ids": order_ids},
            )
        }
    orders = _by_key(read_topic(kafka, kafka.orders_topic, timeout=60), wanted_orders)
    users = _by_key(read_topic(kafka, kafka.users_topic, timeout=60), wanted_users)
    lost = duplicated = reordered = 0
    for order_id in wanted_orders:
        delivery = orders.get(order_id)
        created = len(delivery.kinds[ORDER_CREATED]) if delivery else 0
        changed = len(delivery.kinds[STATUS_CHANGED]) if delivery else 0
        lost += order_id not in terminal or created == 0 or changed == 0
        duplicated += created > 1 or changed > 1 or len(history[order_id]) > 1
        reordered += (delivery is not None and _out_of_order(delivery)) or _history_goes_back(
            history[order_id]
        )
    for user_id in wanted_users:
        announced = len(users[user_id].kinds[USER_CREATED]) if user_id in users else 0
        lost += announced == 0
        duplicated += announced > 1
    return Effects(lost, duplicated, reordered)
