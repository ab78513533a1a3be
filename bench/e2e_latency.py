"""CreateOrder -> PROCESSED latency through the running stack (services, relay, Kafka, processor).

Sends a bounded number of orders at a fixed rate and watches the orders topic for their
OrderStatusChanged events. Prints two figures per percentile:
  - recorded: update_time - create_time of each order, both stamped by the order service, i.e.
    from CreateOrder's statement to UpdateOrderStatus's;
  - observed: from sending CreateOrder to a consumer receiving OrderStatusChanged (one more hop
    through the relay and Kafka than `recorded`).

    python -m bench.e2e_latency --orders 300 --rate 50   # after `make run`
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
from confluent_kafka import OFFSET_END, Consumer, TopicPartition
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc
from google.type import money_pb2

from servicekit.kafka import header
from servicekit.settings import KafkaSettings

STATUS_CHANGED = events_pb2.OrderStatusChanged.DESCRIPTOR.full_name


@dataclass
class StatusWatcher:
    """Collects OrderStatusChanged events from the topic's end onwards, in a thread."""

    kafka: KafkaSettings
    seen: dict[str, tuple[float, events_pb2.OrderStatusChanged]] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        topic = self.kafka.orders_topic
        consumer = Consumer(
            {
                "bootstrap.servers": self.kafka.bootstrap_servers,
                "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
            }
        )
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in partitions])
        try:
            while not self.stop.is_set():
                message = consumer.poll(0.05)
                self.ready.set()  # assigned and polling: orders sent from now on are seen
                if message is None or message.error():
                    continue
                if header(message.headers(), "ce_type") == STATUS_CHANGED:
                    event = events_pb2.OrderStatusChanged.FromString(message.value() or b"")
                    self.seen.setdefault(event.order_id, (time.monotonic(), event))
        finally:
            consumer.close()


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "max": max(samples_ms)}


@dataclass
class E2eLatency:
    sent: int
    completed: int
    recorded_ms: dict[str, float]  # CreateOrder -> UpdateOrderStatus (the service's clock)
    observed_ms: dict[str, float]  # CreateOrder call -> OrderStatusChanged seen on the topic
    sent_per_second: float  # the rate CreateOrder was actually called at
    processed_per_second: float  # orders that reached PROCESSED, from first call to last event


def _send_at_rate(
    orders: orders_pb2_grpc.OrderServiceStub, user_ids: list[str], count: int, rate: float
) -> dict[str, tuple[float, orders_pb2.Order]]:
    """Open loop: each order is sent at its scheduled time, whether or not earlier ones have
    returned (a slow reply must not lower the offered rate). Users take turns."""
    calls = []
    started = time.monotonic()
    for n in range(count):
        time.sleep(max(0.0, started + n / rate - time.monotonic()))
        request = orders_pb2.CreateOrderRequest(
            user_id=user_ids[n % len(user_ids)],
            amount=money_pb2.Money(currency_code="USD", units=10 + n % 90),
        )
        calls.append((time.monotonic(), orders.CreateOrder.future(request, timeout=30)))
    sent = {}
    for sent_at, call in calls:
        order = call.result()
        sent[order.id] = (sent_at, order)
    return sent


def measure(
    kafka: KafkaSettings,
    user_service: str,
    order_service: str,
    orders_to_send: int,
    rate: float,
    timeout: float = 60.0,
    user_count: int = 32,
) -> E2eLatency:
    """Sends `orders_to_send` orders of `user_count` users at `rate` per second and times each to
    its terminal status."""
    watcher = StatusWatcher(kafka)
    threading.Thread(target=watcher.run, daemon=True).start()
    if not watcher.ready.wait(15):
        raise SystemExit("could not read the orders topic: is the stack up?")
    with (
        grpc.insecure_channel(user_service) as user_channel,
        grpc.insecure_channel(order_service) as order_channel,
    ):
        users = users_pb2_grpc.UserServiceStub(user_channel)
        user_ids = [
            users.CreateUser(
                users_pb2.CreateUserRequest(
                    email=f"bench.{uuid.uuid4().hex[:10]}@example.com", name="Bench"
                )
            ).id
            for _ in range(user_count)
        ]
        sent = _send_at_rate(
            orders_pb2_grpc.OrderServiceStub(order_channel), user_ids, orders_to_send, rate
        )

    deadline = time.monotonic() + timeout
    while len(sent.keys() & watcher.seen.keys()) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    watcher.stop.set()

    done = sent.keys() & watcher.seen.keys()
    if len(done) < 2:
        raise SystemExit("too few orders completed to report percentiles")
    recorded = [
        (watcher.seen[i][1].occur_time.ToNanoseconds() - sent[i][1].create_time.ToNanoseconds())
        / 1e6
        for i in done
    ]
    observed = [(watcher.seen[i][0] - sent[i][0]) * 1000 for i in done]
    first_sent = min(at for at, _ in sent.values())
    last_sent = max(at for at, _ in sent.values())
    last_seen = max(watcher.seen[i][0] for i in done)
    return E2eLatency(
        len(sent),
        len(done),
        percentiles(recorded),
        percentiles(observed),
        sent_per_second=len(sent) / max(last_sent - first_sent, 1e-9),
        processed_per_second=len(done) / max(last_seen - first_sent, 1e-9),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="CreateOrder -> PROCESSED latency")
    parser.add_argument("--orders", type=int, default=300, help="how many orders (bounded)")
    parser.add_argument("--rate", type=float, default=50.0, help="orders per second")
    parser.add_argument("--user-service", default="127.0.0.1:50051")
    parser.add_argument("--order-service", default="127.0.0.1:50052")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the last")
    parser.add_argument("--users", type=int, default=32, help="orders are spread over them")
    args = parser.parse_args()
    if not 1 <= args.orders <= 100_000 or args.rate <= 0 or not 1 <= args.users <= 1000:
        parser.error("--orders must be 1..100000, --users 1..1000 and --rate positive")

    result = measure(
        KafkaSettings.from_env(os.environ),
        args.user_service,
        args.order_service,
        args.orders,
        args.rate,
        args.timeout,
        args.users,
    )
    print(
        f"orders sent: {result.sent} at {result.sent_per_second:.0f}/s (asked {args.rate:g}/s);"
        f" terminal: {result.completed}, {result.processed_per_second:.0f}/s"
    )
    print(f"{'latency (ms)':<28}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}")
    for label, cut in (
        ("recorded (create->processed)", result.recorded_ms),
        ("observed (call->event seen)", result.observed_ms),
    ):
        print(f"{label:<28}" + "".join(f"{cut[k]:>9.1f}" for k in ("p50", "p95", "p99", "max")))
    if result.completed < result.sent:
        raise SystemExit(
            f"{result.sent - result.completed} orders not terminal in {args.timeout:g} s"
        )


if __name__ == "__main__":
    main()
