"""Eventing end to end on the real broker: outbox -> Kafka -> processor -> UpdateOrderStatus."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
from confluent_kafka import Producer
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc
from google.type import money_pb2
from sqlalchemy import Engine, bindparam, text

from chaos.topics import Record, read_topic
from servicekit.healthcheck import is_serving
from servicekit.kafka import Headers, cloudevent_headers
from servicekit.local_credentials import admin_channel, tls_of
from servicekit.money import money_to_decimal
from servicekit.server import RunningService
from tests.conftest import KAFKA, PROCESSOR_GROUP, TEST_ENV, RelayHandle, new_relay, unique_email
from testsupport.processes import ServiceProcess, free_port, wait_until

ORDER_CREATED = "ecommerce.events.v1.OrderCreated"
STATUS_CHANGED = "ecommerce.events.v1.OrderStatusChanged"


def processor_env(order_server: RunningService) -> dict[str, str]:
    return {
        **TEST_ENV,
        "ORDER_SERVICE_ADDRESS": f"127.0.0.1:{order_server.port}",
        "PROCESSOR_GROUP_ID": PROCESSOR_GROUP,
        "CALLBACK_RETRY_SECONDS": "1",
    }


@pytest.fixture(scope="module")
def processor(order_server: RunningService, relay: RelayHandle) -> Iterator[ServiceProcess]:
    process = ServiceProcess("processor", "PROCESSOR_HEALTH_PORT", processor_env(order_server))
    yield process
    process.stop()


def money(currency_code: str, units: int, nanos: int = 0) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency_code, units=units, nanos=nanos)


def statuses(engine: Engine, order_ids: list[str]) -> dict[str, str]:
    query = text("SELECT id::text, status FROM orders WHERE id::text IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    with engine.connect() as connection:
        return dict(connection.execute(query, {"ids": order_ids}).all())


def wait_until_terminal(engine: Engine, order_ids: list[str], timeout: float = 120) -> None:
    def all_terminal() -> bool:
        return "CREATED" not in statuses(engine, order_ids).values()

    assert wait_until(all_terminal, timeout=timeout, interval=0.2), Counter(
        statuses(engine, order_ids).values()
    )


def transitions(engine: Engine, order_ids: list[str]) -> Counter[str]:
    query = text(
        "SELECT order_id::text FROM order_status_changes WHERE order_id::text IN :ids"
    ).bindparams(bindparam("ids", expanding=True))
    with engine.connect() as connection:
        return Counter(row[0] for row in connection.execute(query, {"ids": order_ids}))


def orders_topic() -> list[Record]:
    return read_topic(KAFKA, KAFKA.orders_topic)


def status_changed_events(records: list[Record]) -> dict[str, set[str]]:
    """order id -> distinct OrderStatusChanged event ids seen on the topic."""
    seen: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if record.header("ce_type") == STATUS_CHANGED:
            event = events_pb2.OrderStatusChanged.FromString(record.value or b"")
            seen[event.order_id].add(event.event_id)
    return seen


def expected_status(amount: money_pb2.Money) -> str:
    accepted = amount.currency_code in {"USD", "EUR", "GBP"}
    return "PROCESSED" if accepted and money_to_decimal(amount) <= 10_000 else "FAILED"


def test_500_orders_reach_the_right_terminal_status_once(
    processor: ServiceProcess,
    users: users_pb2_grpc.UserServiceStub,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    customers = [
        users.CreateUser(users_pb2.CreateUserRequest(email=unique_email("bulk"), name="Bulk")).id
        for _ in range(10)
    ]
    amounts = [
        money("USD", 25, 990_000_000),  # processed
        money("EUR", 10_000),  # processed: the limit itself is allowed
        money("GBP", 10_000, 1),  # failed: above the limit by one nano
        money("JPY", 500),  # failed: currency not accepted
        money("USD", 250_000),  # failed: above the limit
    ]
    requests = [
        orders_pb2.CreateOrderRequest(
            user_id=customers[n % len(customers)],
            amount=amounts[n % len(amounts)],
            request_id=str(uuid.uuid4()),
        )
        for n in range(500)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        created = list(pool.map(orders.CreateOrder, requests))
    order_ids = [order.id for order in created]

    wait_until_terminal(engine, order_ids)

    final = statuses(engine, order_ids)
    for order in created:
        assert final[order.id] == expected_status(order.amount), order
    assert Counter(final.values()) == {"PROCESSED": 200, "FAILED": 300}
    assert transitions(engine, order_ids) == dict.fromkeys(order_ids, 1)
    # Duplicates on the wire are allowed; a second distinct status event would be a second effect.
    assert wait_until(
        lambda: len(status_changed_events(orders_topic()).keys() & set(order_ids)) == 500,
        timeout=30,
    )
    announced = status_changed_events(orders_topic())
    assert all(len(announced[order_id]) == 1 for order_id in order_ids)


def test_events_decode_with_generated_classes_and_carry_cloudevents_headers(
    processor: ServiceProcess,
    users: users_pb2_grpc.UserServiceStub,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    user = users.CreateUser(users_pb2.CreateUserRequest(email=unique_email("ce"), name="Ce"))
    order = orders.CreateOrder(
        orders_pb2.CreateOrderRequest(user_id=user.id, amount=money("USD", 12))
    )
    wait_until_terminal(engine, [order.id])

    def published(topic: str, event_type: str) -> list[Record]:
        return [
            record
            for record in read_topic(KAFKA, topic)
            if record.key == user.id.encode() and record.header("ce_type") == event_type
        ]

    assert wait_until(lambda: published(KAFKA.orders_topic, STATUS_CHANGED), timeout=20)
    (user_created,) = published(KAFKA.users_topic, "ecommerce.events.v1.UserCreated")
    (order_created,) = published(KAFKA.orders_topic, ORDER_CREATED)
    (status_changed,) = published(KAFKA.orders_topic, STATUS_CHANGED)

    assert events_pb2.UserCreated.FromString(user_created.value or b"").user == user
    created_event = events_pb2.OrderCreated.FromString(order_created.value or b"")
    assert created_event.order == order
    assert created_event.occur_time == order.create_time
    changed_event = events_pb2.OrderStatusChanged.FromString(status_changed.value or b"")
    assert (changed_event.order_id, changed_event.user_id) == (order.id, user.id)
    assert changed_event.old_status == orders_pb2.ORDER_STATUS_CREATED
    assert changed_event.new_status == orders_pb2.ORDER_STATUS_PROCESSED

    for record, event, source in (
        (user_created, events_pb2.UserCreated.FromString(user_created.value or b""), "user"),
        (order_created, created_event, "order"),
        (status_changed, changed_event, "order"),
    ):
        assert record.header("ce_specversion") == "1.0"
        assert record.header("ce_id") == event.event_id
        assert record.header("ce_source") == f"/ecommerce/{source}_service"
        assert record.header("content-type") == "application/protobuf"
        ce_time = datetime.fromisoformat(record.header("ce_time") or "")
        assert ce_time == event.occur_time.ToDatetime().replace(tzinfo=ce_time.tzinfo)
        assert ce_time.utcoffset() is not None and not ce_time.utcoffset()


def place_orders(
    orders: orders_pb2_grpc.OrderServiceStub, user_id: str, currency: str, count: int
) -> list[str]:
    """Places orders of 1, 2, … `count` units; returns their ids."""
    return [
        orders.CreateOrder(
            orders_pb2.CreateOrderRequest(user_id=user_id, amount=money(currency, units))
        ).id
        for units in range(1, count + 1)
    ]


def produce(topic: str, key: str, value: bytes, headers: Headers | None = None) -> None:
    producer = Producer(KAFKA.client_config(acks="all"))
    producer.produce(topic, key=key.encode(), value=value, headers=headers or [])
    assert producer.flush(10) == 0


def order_created_headers(event: events_pb2.OrderCreated) -> Headers:
    return cloudevent_headers(
        event.event_id, "/tests", ORDER_CREATED, event.occur_time.ToDatetime()
    )


def test_a_redelivered_order_created_applies_once(
    processor: ServiceProcess,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    order = orders.CreateOrder(
        orders_pb2.CreateOrderRequest(user_id=user.id, amount=money("EUR", 99))
    )
    wait_until_terminal(engine, [order.id])
    first = orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id))
    (original,) = [
        record
        for record in orders_topic()
        if record.key == user.id.encode() and record.header("ce_type") == ORDER_CREATED
    ]

    for _ in range(2):  # the same event, byte for byte, delivered twice more
        produce(KAFKA.orders_topic, user.id, original.value or b"", original.headers)
    # Same key, same partition: once this later order is done, the copies were handled too.
    later = orders.CreateOrder(
        orders_pb2.CreateOrderRequest(user_id=user.id, amount=money("EUR", 1))
    )
    wait_until_terminal(engine, [later.id])

    assert orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id)) == first
    assert transitions(engine, [order.id]) == {order.id: 1}


def test_poison_goes_to_the_dlq_and_the_partition_moves_on_then_replays(
    processor: ServiceProcess,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    missing_order = orders_pb2.Order(
        id=str(uuid.uuid4()),
        user_id=user.id,
        amount=money("USD", 5),
        status=orders_pb2.ORDER_STATUS_CREATED,
    )
    real_event = events_pb2.OrderCreated(event_id=str(uuid.uuid4()), order=missing_order)
    real_event.occur_time.GetCurrentTime()
    valid_bytes = real_event.SerializeToString()
    valid_headers = order_created_headers(real_event)
    poison = {
        "random-bytes": (b"\xff\xfe\x00garbage\x81", valid_headers, "UNDECODABLE"),
        "truncated": (valid_bytes[: len(valid_bytes) // 2], valid_headers, "UNDECODABLE"),
        "wrong-type": (
            valid_bytes,
            [
                (k, b"ecommerce.events.v1.Nonsense" if k == "ce_type" else v)
                for k, v in valid_headers
            ],
            "UNKNOWN_EVENT_TYPE",
        ),
        "no-headers": (valid_bytes, [], "MISSING_CE_TYPE"),
        "oversized": (b"\x0a" + b"\xff" * 900_000, valid_headers, "UNDECODABLE"),
        "order-not-found": (valid_bytes, valid_headers, "CALLBACK_NOT_FOUND"),
    }
    for case, (value, headers, _reason) in poison.items():
        produce(KAFKA.orders_topic, user.id, value, [*headers, ("x-test-case", case.encode())])
    behind = orders.CreateOrder(
        orders_pb2.CreateOrderRequest(user_id=user.id, amount=money("GBP", 3))
    )

    wait_until_terminal(engine, [behind.id], timeout=60)  # the same partition kept moving

    def dead_letters() -> dict[str, Record]:
        return {
            record.header("x-test-case") or "": record
            for record in read_topic(KAFKA, KAFKA.orders_dlq_topic)
            if record.key == user.id.encode()
        }

    assert wait_until(lambda: len(dead_letters()) == len(poison), timeout=30), dead_letters()
    for case, letter in dead_letters().items():
        value, _headers, reason = poison[case]
        assert letter.value == value
        assert letter.header("dlq_reason") == reason
        assert letter.header("dlq_original_topic") == KAFKA.orders_topic
        assert letter.header("dlq_original_offset") is not None
        assert letter.header("dlq_error")
    assert processor.process.poll() is None  # still up

    # The cause of one of them goes away: the order now exists. A replay completes it.
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO orders (id, user_id, amount, currency_code, status)"
                " VALUES (:id, :user_id, 5, 'USD', 'CREATED')"
            ),
            {"id": missing_order.id, "user_id": user.id},
        )
    # The DLQ is the run's: earlier tests may have dead-lettered messages of their own.
    in_dlq = len(read_topic(KAFKA, KAFKA.orders_dlq_topic))
    replayed = processor_command("processor.dlq_replay")
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed {in_dlq} message(s)" in replayed.stdout

    wait_until_terminal(engine, [missing_order.id], timeout=60)
    assert statuses(engine, [missing_order.id]) == {missing_order.id: "PROCESSED"}


def processor_command(module: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module],
        env={**os.environ, **TEST_ENV, "PROCESSOR_GROUP_ID": PROCESSOR_GROUP},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_events_committed_while_kafka_is_down_are_published_when_it_is_back(
    processor: ServiceProcess,
    relay: RelayHandle,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    relay.stop()
    # The only relay now sees no broker: it leads, fails to publish, keeps every row.
    cut_off = new_relay(env={"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    cut_off.start()
    try:
        placed = place_orders(orders, user.id, "USD", 20)
        assert not wait_until(lambda: unpublished(engine) == 0, timeout=4)
        assert set(statuses(engine, placed).values()) == {"CREATED"}
    finally:
        cut_off.stop()
    relay.start()

    wait_until_terminal(engine, placed, timeout=60)
    assert transitions(engine, placed) == dict.fromkeys(placed, 1)
    assert wait_until(lambda: unpublished(engine) == 0, timeout=20)


def test_events_of_a_killed_service_are_published_after_it(
    processor: ServiceProcess,
    relay: RelayHandle,
    user: users_pb2.User,
    engine: Engine,
) -> None:
    relay.stop()
    service = ServiceProcess(
        "order_service", "ORDER_SERVICE_PORT", {**TEST_ENV, "OUTBOX_RELAY_ENABLED": "true"}
    )
    try:
        with admin_channel(service.address) as channel:
            placed = place_orders(orders_pb2_grpc.OrderServiceStub(channel), user.id, "EUR", 40)
        service.process.kill()  # SIGKILL: no drain, no flush, whatever was in flight
        service.process.wait(10)
    finally:
        service.stop()
    relay.start()

    wait_until_terminal(engine, placed, timeout=60)
    assert transitions(engine, placed) == dict.fromkeys(placed, 1)


def unpublished(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text("SELECT count(*) FROM outbox_events")) or 0)


def test_a_second_processor_shares_the_work_and_leaves_cleanly_on_sigterm(
    processor: ServiceProcess,
    order_server: RunningService,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    second = ServiceProcess("processor", "PROCESSOR_HEALTH_PORT", processor_env(order_server))
    try:
        assert is_serving(second.address, tls_of("client"), "ecommerce.processor")
        # Orders keep coming while the group rebalances onto two members and back to one.
        placed = place_orders(orders, user.id, "USD", 100)
        second.terminate()
        assert second.wait(timeout=30) == 0
        assert any(line.get("message") == "stopped" for line in second.log_lines)
    finally:
        second.stop()

    wait_until_terminal(engine, placed, timeout=60)
    assert transitions(engine, placed) == dict.fromkeys(placed, 1)
    assert processor.process.poll() is None


def test_the_outbox_keeps_only_what_is_not_published_yet(
    processor: ServiceProcess,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    placed = place_orders(orders, user.id, "USD", 30)
    wait_until_terminal(engine, placed, timeout=60)
    # Both events of every order were published, and their rows deleted with the acknowledgement.
    assert wait_until(lambda: unpublished(engine) == 0, timeout=20)


def test_two_relays_at_once_publish_each_event_once(
    processor: ServiceProcess,
    relay: RelayHandle,
    user: users_pb2.User,
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
) -> None:
    replica = new_relay()  # as if a second order_service replica were running
    replica.start()
    try:
        placed = place_orders(orders, user.id, "GBP", 50)
        wait_until_terminal(engine, placed, timeout=60)
    finally:
        replica.stop()

    created_ids = [
        record.header("ce_id")
        for record in orders_topic()
        if record.key == user.id.encode() and record.header("ce_type") == ORDER_CREATED
    ]
    assert len(created_ids) == len(placed)
    assert len(set(created_ids)) == len(placed)
