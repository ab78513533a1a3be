"""Runs each fault under load and measures what a user of an outbox + Kafka design is promised:
nothing acknowledged is lost, nothing is applied twice."""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc
from google.type import money_pb2
from sqlalchemy import Engine, create_engine, text

from chaos.load import OrderLoad
from chaos.processes import wait_until
from chaos.stack import CHAOS_DATABASE_URL, Stack, infra
from chaos.topics import read_topic
from servicekit.healthcheck import is_serving
from servicekit.local_credentials import admin_channel, tls_of
from servicekit.settings import with_password

STATUS_CHANGED = events_pb2.OrderStatusChanged.DESCRIPTOR.full_name

Fault = Callable[[Stack], str]  # injects the fault, returns once the part is back; a note


def kill9(name: str) -> Fault:
    def inject(stack: Stack) -> str:
        time.sleep(random.uniform(0, 0.5))  # anywhere between a commit and its publication
        stack.kill(name, signal.SIGKILL)
        time.sleep(1)
        stack.restart(name)
        return ""

    return inject


def sigterm(name: str) -> Fault:
    def inject(stack: Stack) -> str:
        exit_code = stack.kill(name, signal.SIGTERM)
        stack.restart(name)
        return f"exit code {exit_code}"

    return inject


def kafka_stopped(seconds: float) -> Fault:
    def inject(stack: Stack) -> str:
        infra("kafka down")
        time.sleep(seconds)
        infra("kafka up")
        return f"broker down {seconds:g} s"

    return inject


def kafka_broker_killed(stack: Stack) -> str:
    """kill -9 of one broker of a three-node cluster (make infra-up KAFKA_BROKERS=3), back after
    10 s: with replication factor 3 and min.insync.replicas=2, writes go on meanwhile."""
    node = random.randint(1, 3)
    infra(f"kafka stop-node {node} KILL")
    time.sleep(10)
    infra(f"kafka start-node {node}")
    return f"broker {node} of 3 killed, restarted after 10 s"


def postgres_restarted(stack: Stack) -> str:
    seen_not_serving = threading.Event()
    stop_watching = threading.Event()

    def watch() -> None:
        while not stop_watching.is_set():
            if not is_serving(stack.address("order_service"), tls_of("client"), timeout=1):
                seen_not_serving.set()
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    infra("postgres down")
    time.sleep(3)
    infra("postgres up")
    wait_until(lambda: is_serving(stack.address("order_service"), tls_of("client")), timeout=60)
    stop_watching.set()
    watcher.join()
    return "NOT_SERVING seen while down" if seen_not_serving.is_set() else "NOT_SERVING not seen"


FAULTS: dict[str, Fault] = {
    "kill -9 processor": kill9("processor"),
    "kill -9 order_service": kill9("order_service"),
    "Kafka stopped 10 s": kafka_stopped(10),
    "PostgreSQL restarted": postgres_restarted,
    "SIGTERM order_service": sigterm("order_service"),
    "SIGTERM user_service": sigterm("user_service"),
    "SIGTERM processor": sigterm("processor"),
    "kill -9 one Kafka broker of 3": kafka_broker_killed,
}
PROFILES = {
    "short": (["kill -9 processor", "kill -9 order_service", "SIGTERM order_service"], 300),
    "full": ([name for name in FAULTS if "of 3" not in name], 5000),
    # Needs the three-broker cluster: make infra-up KAFKA_BROKERS=3.
    "cluster": (["kill -9 one Kafka broker of 3"], 5000),
}


@dataclass
class FaultOutcome:
    fault: str
    acknowledged: int
    lost: int
    duplicate_effects: int
    failed_attempts: Counter[str]
    abandoned: int
    recovery_seconds: float
    note: str


def create_users(stack: Stack, count: int) -> list[str]:
    with admin_channel(stack.address("user_service")) as channel:
        stub = users_pb2_grpc.UserServiceStub(channel)
        return [
            stub.CreateUser(
                users_pb2.CreateUserRequest(
                    email=f"chaos.{uuid.uuid4().hex[:12]}@example.com", name="Chaos"
                ),
                timeout=10,
            ).id
            for _ in range(count)
        ]


def terminal_count(engine: Engine, order_ids: list[str]) -> int:
    query = text(
        "SELECT count(*) FROM orders WHERE id = ANY(CAST(:ids AS uuid[])) AND status <> 'CREATED'"
    )
    with engine.connect() as connection:
        return int(connection.scalar(query, {"ids": order_ids}) or 0)


def time_to_process_a_new_order(stack: Stack, engine: Engine, user_id: str, since: float) -> float:
    """Seconds from `since` until an order placed now reaches a terminal status."""
    with admin_channel(stack.address("order_service")) as channel:
        stub = orders_pb2_grpc.OrderServiceStub(channel)
        request = orders_pb2.CreateOrderRequest(
            user_id=user_id,
            amount=money_pb2.Money(currency_code="USD", units=1),
            request_id=str(uuid.uuid4()),
        )
        order_id = ""

        def placed() -> bool:
            nonlocal order_id
            try:
                order_id = stub.CreateOrder(request, timeout=5).id
            except grpc.RpcError:
                return False
            return True

        wait_until(placed, timeout=120, interval=0.2)
    wait_until(lambda: terminal_count(engine, [order_id]) == 1, timeout=120, interval=0.05)
    return time.monotonic() - since


def effects(engine: Engine, stack: Stack, order_ids: list[str]) -> tuple[int, int]:
    """(lost, duplicate effects) among acknowledged orders."""
    wanted = set(order_ids)
    with engine.connect() as connection:
        transitions = Counter(
            row[0]
            for row in connection.execute(
                text(
                    "SELECT order_id::text FROM order_status_changes"
                    " WHERE order_id = ANY(CAST(:ids AS uuid[]))"
                ),
                {"ids": order_ids},
            )
        )
    announced: dict[str, set[str]] = {}
    for record in read_topic(stack.kafka, stack.kafka.orders_topic, timeout=60):
        if record.header("ce_type") == STATUS_CHANGED:
            event = events_pb2.OrderStatusChanged.FromString(record.value or b"")
            if event.order_id in wanted:
                announced.setdefault(event.order_id, set()).add(event.event_id)
    lost = len(order_ids) - terminal_count(engine, order_ids)
    duplicated = sum(
        1
        for order_id in order_ids
        if transitions[order_id] > 1 or len(announced.get(order_id, ())) > 1
    )
    return lost, duplicated


def run_fault(
    stack: Stack, engine: Engine, user_ids: list[str], name: str, orders: int
) -> FaultOutcome:
    load = OrderLoad(stack.address("order_service"), user_ids, total=orders, time_limit=900)
    load.start()
    wait_until(lambda: load.acknowledged_count >= orders // 3, timeout=300)
    injected = time.monotonic()
    note = FAULTS[name](stack)
    recovery = time_to_process_a_new_order(stack, engine, user_ids[0], since=injected)
    result = load.join()
    acknowledged = result.acknowledged
    # Settle: everything acknowledged must become terminal (bounded).
    wait_until(lambda: terminal_count(engine, acknowledged) == len(acknowledged), timeout=300)
    wait_until(lambda: _unpublished(engine) == 0, timeout=120)
    lost, duplicated = effects(engine, stack, acknowledged)
    return FaultOutcome(
        name,
        len(acknowledged),
        lost,
        duplicated,
        result.failed_attempts,
        result.abandoned,
        recovery,
        note,
    )


def _unpublished(engine: Engine) -> int:
    with engine.connect() as connection:
        query = text("SELECT count(*) FROM outbox_events")
        return int(connection.scalar(query) or 0)


def run_suite(
    fault_names: list[str], orders_per_fault: int, on_outcome: Callable[[FaultOutcome], None]
) -> list[FaultOutcome]:
    stack = Stack()
    stack.prepare()
    engine = create_engine(with_password(CHAOS_DATABASE_URL), pool_pre_ping=True)
    outcomes = []
    try:
        stack.start_all()
        user_ids = create_users(stack, 20)
        for name in fault_names:
            outcome = run_fault(stack, engine, user_ids, name, orders_per_fault)
            on_outcome(outcome)
            outcomes.append(outcome)
    finally:
        stack.stop_all()
        engine.dispose()
    return outcomes


def table(outcomes: list[FaultOutcome]) -> str:
    header = (
        "| fault | orders acknowledged | lost | duplicate effects | failed attempts (code: count)"
        " | requests abandoned | seconds to recover | note |\n"
        "|---|---:|---:|---:|---|---:|---:|---|"
    )
    rows = [
        f"| {o.fault} | {o.acknowledged} | {o.lost} | {o.duplicate_effects} | "
        + (", ".join(f"{code}: {n}" for code, n in sorted(o.failed_attempts.items())) or "none")
        + f" | {o.abandoned} | {o.recovery_seconds:.1f} | {o.note} |"
        for o in outcomes
    ]
    return "\n".join([header, *rows])
