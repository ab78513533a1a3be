"""Runs each fault under load and measures what a user of an outbox + Kafka design is promised:
nothing acknowledged is lost, nothing is applied twice, nothing is seen out of order. The stack
runs two replicas of every part; a fault that names a service hits one replica (the relay leader
where it has one)."""

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
from confluent_kafka import Producer
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc
from google.type import money_pb2
from sqlalchemy import Engine, create_engine, text

from chaos.effects import effects
from chaos.load import OrderLoad, admin_channel_to
from chaos.stack import CHAOS_DATABASE_URL, RELAY_LEASE_SECONDS, Stack, infra
from servicekit.kafka import producer_config, relay_transactional_id
from servicekit.settings import with_password
from testsupport.processes import wait_until

REPLICAS = 2
# The replica partition faults cut off: it runs in a network namespace of the run's own.
ISOLATED = "order_service-2"

Injection = Callable[["Chaos"], str]  # injects the fault, returns once the part is back; a note


@dataclass(frozen=True)
class Fault:
    """A fault and what its run needs besides the injection itself."""

    inject: Injection
    isolated: bool = False  # runs ISOLATED in a network namespace (root, ip, iptables)
    # The orders after the first third (placed before the fault) spread over this long.
    load_seconds: float | None = None


@dataclass
class Chaos:
    """What an injection works on: the stack, and the run's own database as its owner."""

    stack: Stack
    engine: Engine

    def target(self, service: str) -> str:
        """The replica a fault of `service` hits: the relay leader if one leads, else any."""
        leader = self.stack.relay_leader(self.engine, service)
        return leader or random.choice(self.stack.replicas(service))

    def outbox_rows(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.scalar(text("SELECT count(*) FROM outbox_events")) or 0)


def kill9(service: str) -> Injection:
    def inject(chaos: Chaos) -> str:
        time.sleep(random.uniform(0, 0.5))  # anywhere between a commit and its publication
        name = chaos.target(service)
        chaos.stack.kill(name, signal.SIGKILL)
        time.sleep(1)
        chaos.stack.restart(name)
        return name

    return inject


def sigterm(service: str) -> Injection:
    def inject(chaos: Chaos) -> str:
        name = chaos.target(service)
        exit_code = chaos.stack.kill(name, signal.SIGTERM)
        chaos.stack.restart(name)
        return f"{name}, exit code {exit_code}"

    return inject


def kafka_stopped(seconds: float) -> Injection:
    def inject(chaos: Chaos) -> str:
        infra("kafka down")
        time.sleep(seconds)
        infra("kafka up")
        return f"broker down {seconds:g} s"

    return inject


def kafka_away(seconds: float) -> Injection:
    """The broker stopped for `seconds` while orders keep coming: the outbox grows, then drains."""

    def inject(chaos: Chaos) -> str:
        peak = chaos.outbox_rows()
        infra("kafka down")
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                peak = max(peak, chaos.outbox_rows())
                time.sleep(1)
        finally:
            infra("kafka up")
        back = time.monotonic()
        drained = wait_until(lambda: chaos.outbox_rows() == 0, timeout=600, interval=0.5)
        catch_up = f"{time.monotonic() - back:.1f} s" if drained else "not within 600 s"
        return f"broker down {seconds:g} s; outbox peak {peak} rows, empty {catch_up} after"

    return inject


def kafka_broker_killed(chaos: Chaos) -> str:
    """kill -9 of one broker of a three-node cluster (make infra-up KAFKA_BROKERS=3), back after
    10 s: with replication factor 3 and min.insync.replicas=2, writes go on meanwhile."""
    node = random.randint(1, 3)
    infra(f"kafka stop-node {node} KILL")
    time.sleep(10)
    infra(f"kafka start-node {node}")
    return f"broker {node} of 3 killed, restarted after 10 s"


def postgres_restarted(chaos: Chaos) -> str:
    seen_not_serving = threading.Event()
    stop_watching = threading.Event()
    watched = chaos.stack.replicas("order_service")[0]

    def watch() -> None:
        while not stop_watching.is_set():
            if not chaos.stack.is_serving(watched, timeout=1):
                seen_not_serving.set()
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    infra("postgres down")
    time.sleep(3)
    infra("postgres up")
    wait_until(lambda: chaos.stack.is_serving(watched), timeout=60)
    stop_watching.set()
    watcher.join()
    return "NOT_SERVING seen while down" if seen_not_serving.is_set() else "NOT_SERVING not seen"


def partition(away: str, seconds: float) -> Injection:
    """ISOLATED, made the relay leader first, cut off from PostgreSQL or Kafka (`away`) for
    `seconds` by DROP rules in its namespace; the note says where leadership went."""

    def inject(chaos: Chaos) -> str:
        stack, namespace = chaos.stack, chaos.stack.namespace
        assert namespace is not None, "a partition needs the isolated replica"
        handed_over = _lead_from(chaos, ISOLATED)
        ports = namespace.ports[:1] if away == "PostgreSQL" else namespace.ports[1:]
        leaders: list[str] = []
        peak = chaos.outbox_rows()
        for port in ports:
            namespace.cut(port)
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                leader = stack.relay_leader(chaos.engine, "order_service") or "none"
                if not leaders or leaders[-1] != leader:
                    leaders.append(leader)
                peak = max(peak, chaos.outbox_rows())
                time.sleep(0.5)
        finally:
            for port in ports:
                namespace.heal(port)
        healed = time.monotonic()
        back = wait_until(lambda: stack.is_serving(ISOLATED, timeout=1), timeout=60, interval=0.2)
        serving = f"serving {time.monotonic() - healed:.1f} s after" if back else "not serving"
        return (
            f"{ISOLATED} cut off from {away} {seconds:g} s{handed_over}; relay leader"
            f" while cut: {' → '.join(leaders)}; outbox peak {peak} rows; {serving}"
        )

    return inject


def relay_leader_paused(seconds: float) -> Injection:
    """SIGSTOP of order_service's relay leader for longer than its lease, then SIGCONT: another
    replica must take over within the lease and fence it; woken, it must publish nothing."""

    def inject(chaos: Chaos) -> str:
        stack = chaos.stack
        paused = _leader_of(chaos, "order_service")
        stack.send(paused, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            took_over = wait_until(
                lambda: stack.relay_leader(chaos.engine, "order_service") not in (None, paused),
                timeout=seconds,
                interval=0.2,
            )
            handed_over = time.monotonic() - stopped_at
            time.sleep(max(0.0, seconds - handed_over))
        finally:
            stack.send(paused, signal.SIGCONT)
        leader = stack.relay_leader(chaos.engine, "order_service")
        taken = f"{leader} led {handed_over:.1f} s after" if took_over else "nobody took over"
        return f"{paused} stopped {seconds:g} s (lease {RELAY_LEASE_SECONDS:g} s); {taken}"

    return inject


def relay_producer_fenced(chaos: Chaos) -> str:
    """A real fatal producer error: a producer of the operator's takes the transactional id of
    order_service's relays, so the leader's producer is fenced; the relay must start over with a
    new producer (before, such an error ended the relay thread or was retried forever)."""
    leader = _leader_of(chaos, "order_service")
    relays_id = relay_transactional_id(chaos.stack.kafka, "order_service")
    intruder = Producer(
        producer_config(chaos.stack.kafka, "chaos-intruder", **{"transactional.id": relays_id})
    )
    intruder.init_transactions(30)
    intruder.close()
    return f"{leader}'s producer fenced"


def _leader_of(chaos: Chaos, service: str) -> str:
    """The replica that leads `service`'s relay, once one does."""
    leader: list[str | None] = [None]

    def leads() -> bool:
        leader[0] = chaos.stack.relay_leader(chaos.engine, service)
        return leader[0] is not None

    assert wait_until(leads, timeout=30, interval=0.2), f"no relay of {service} leads"
    assert leader[0] is not None
    return leader[0]


def _lead_from(chaos: Chaos, name: str) -> str:
    """Makes `name`'s relay the leader, restarting (SIGTERM) the replica that leads instead;
    returns what the note should say about it."""
    service = chaos.stack.parts[name].service
    leads = lambda: chaos.stack.relay_leader(chaos.engine, service) == name  # noqa: E731
    for _attempt in range(3):
        leader = chaos.stack.relay_leader(chaos.engine, service)
        if leader is None or leader == name:
            if wait_until(leads, timeout=15):
                return ""
            continue
        chaos.stack.kill(leader, signal.SIGTERM)
        wait_until(leads, timeout=15)
        chaos.stack.restart(leader)
    return f" (its relay did not lead: {chaos.stack.relay_leader(chaos.engine, service)})"


FAULTS: dict[str, Fault | Injection] = {
    "kill -9 processor": kill9("processor"),
    "kill -9 order_service": kill9("order_service"),
    "Kafka stopped 10 s": kafka_stopped(10),
    "PostgreSQL restarted": postgres_restarted,
    "SIGTERM order_service": sigterm("order_service"),
    "SIGTERM user_service": sigterm("user_service"),
    "SIGTERM processor": sigterm("processor"),
    "partition order_service ↔ PostgreSQL 20 s": Fault(partition("PostgreSQL", 20), isolated=True),
    "partition order_service ↔ Kafka 20 s": Fault(partition("Kafka", 20), isolated=True),
    "Kafka away 5 minutes under load": Fault(kafka_away(300), load_seconds=300),
    "SIGSTOP relay leader past its lease": relay_leader_paused(2 * RELAY_LEASE_SECONDS),
    "relay producer fenced (fatal error)": relay_producer_fenced,
    "kill -9 one Kafka broker of 3": kafka_broker_killed,
}
PROFILES = {
    "short": (
        [
            "kill -9 processor",
            "kill -9 order_service",
            "SIGTERM order_service",
            "SIGSTOP relay leader past its lease",
            "relay producer fenced (fatal error)",
        ],
        300,
    ),
    "full": ([name for name in FAULTS if "of 3" not in name], 5000),
    # Needs the three-broker cluster: make infra-up KAFKA_BROKERS=3.
    "cluster": (["kill -9 one Kafka broker of 3"], 5000),
}


def fault(name: str) -> Fault:
    entry = FAULTS[name]
    return entry if isinstance(entry, Fault) else Fault(entry)


@dataclass
class FaultOutcome:
    fault: str
    acknowledged: int
    lost: int
    duplicate_effects: int
    reordered: int
    failed_attempts: Counter[str]
    abandoned: int
    recovery_seconds: float
    note: str

    @property
    def failed(self) -> bool:
        return bool(self.lost or self.duplicate_effects or self.reordered)


def create_users(stack: Stack, count: int) -> list[str]:
    """`count` users, created round-robin through the user_service replicas."""
    channels = [admin_channel_to(address) for address in stack.addresses("user_service")]
    try:
        stubs = [users_pb2_grpc.UserServiceStub(channel) for channel in channels]
        return [
            stubs[number % len(stubs)]
            .CreateUser(
                users_pb2.CreateUserRequest(
                    email=f"chaos.{uuid.uuid4().hex[:12]}@example.com", name="Chaos"
                ),
                timeout=10,
            )
            .id
            for number in range(count)
        ]
    finally:
        for channel in channels:
            channel.close()


def terminal_count(engine: Engine, order_ids: list[str]) -> int:
    query = text(
        "SELECT count(*) FROM orders WHERE id = ANY(CAST(:ids AS uuid[])) AND status <> 'CREATED'"
    )
    with engine.connect() as connection:
        return int(connection.scalar(query, {"ids": order_ids}) or 0)


def time_to_process_a_new_order(stack: Stack, engine: Engine, user_id: str, since: float) -> float:
    """Seconds from `since` until an order placed now (through any replica that takes it)
    reaches a terminal status."""
    channels = [admin_channel_to(address) for address in stack.addresses("order_service")]
    stubs = [orders_pb2_grpc.OrderServiceStub(channel) for channel in channels]
    request = orders_pb2.CreateOrderRequest(
        user_id=user_id,
        amount=money_pb2.Money(currency_code="USD", units=1),
        request_id=str(uuid.uuid4()),
    )
    order_id = ""
    attempts = iter(range(10**6))

    def placed() -> bool:
        nonlocal order_id
        try:
            order_id = stubs[next(attempts) % len(stubs)].CreateOrder(request, timeout=5).id
        except grpc.RpcError:
            return False
        return True

    try:
        wait_until(placed, timeout=120, interval=0.2)
    finally:
        for channel in channels:
            channel.close()
    wait_until(lambda: terminal_count(engine, [order_id]) == 1, timeout=120, interval=0.05)
    return time.monotonic() - since


def run_fault(chaos: Chaos, user_ids: list[str], name: str, orders: int) -> FaultOutcome:
    stack, engine, plan = chaos.stack, chaos.engine, fault(name)
    user_ids = user_ids + create_users(stack, 4)  # UserCreated through each replica, each fault
    before = orders // 3
    load = OrderLoad(
        stack.addresses("order_service"),
        user_ids,
        total=orders,
        time_limit=900,
        rate=(orders - before) / plan.load_seconds if plan.load_seconds else None,
        paced_from=before,
    )
    load.start()
    wait_until(lambda: load.acknowledged_count >= before, timeout=300)
    injected = time.monotonic()
    note = plan.inject(chaos)
    recovery = time_to_process_a_new_order(stack, engine, user_ids[0], since=injected)
    result = load.join()
    acknowledged = result.acknowledged
    # Settle: everything acknowledged must become terminal (bounded).
    wait_until(lambda: terminal_count(engine, acknowledged) == len(acknowledged), timeout=300)
    wait_until(lambda: chaos.outbox_rows() == 0, timeout=120)
    seen = effects(engine, stack.kafka, acknowledged, user_ids)
    return FaultOutcome(
        name,
        len(acknowledged),
        seen.lost,
        seen.duplicated,
        seen.reordered,
        result.failed_attempts,
        result.abandoned,
        recovery,
        note,
    )


def run_suite(
    fault_names: list[str], orders_per_fault: int, on_outcome: Callable[[FaultOutcome], None]
) -> list[FaultOutcome]:
    isolated = any(fault(name).isolated for name in fault_names)
    stack = Stack(replicas=REPLICAS, isolate=ISOLATED if isolated else None)
    engine = create_engine(with_password(CHAOS_DATABASE_URL), pool_pre_ping=True)
    outcomes = []
    try:
        stack.prepare()
        stack.start_all()
        chaos = Chaos(stack, engine)
        user_ids = create_users(stack, 20)
        for name in fault_names:
            outcome = run_fault(chaos, user_ids, name, orders_per_fault)
            on_outcome(outcome)
            outcomes.append(outcome)
    finally:
        stack.stop_all()
        engine.dispose()
    return outcomes


def table(outcomes: list[FaultOutcome]) -> str:
    header = (
        "| fault | orders acknowledged | lost | duplicate effects | reordered"
        " | failed attempts (code: count) | requests abandoned | seconds to recover | note |\n"
        "|---|---:|---:|---:|---:|---|---:|---:|---|"
    )
    rows = [
        f"| {o.fault} | {o.acknowledged} | {o.lost} | {o.duplicate_effects} | {o.reordered} | "
        + (", ".join(f"{code}: {n}" for code, n in sorted(o.failed_attempts.items())) or "none")
        + f" | {o.abandoned} | {o.recovery_seconds:.1f} | {o.note} |"
        for o in outcomes
    ]
    return "\n".join([header, *rows])
