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
import functools
import os
import statistics
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import grpc
from confluent_kafka import OFFSET_END, Consumer, TopicPartition
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc
from google.rpc import error_details_pb2, status_pb2
from google.type import money_pb2

from servicekit.kafka import header
from servicekit.local_credentials import admin_channel, tls_of
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
            self.kafka.client_config(
                **{"group.id": f"bench-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
            )
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


def start_watcher(kafka: KafkaSettings) -> StatusWatcher:
    """A StatusWatcher polling in a daemon thread; returns once orders sent from now on are seen."""
    watcher = StatusWatcher(kafka)
    threading.Thread(target=watcher.run, daemon=True).start()
    if not watcher.ready.wait(15):
        raise SystemExit("could not read the orders topic: is the stack up?")
    return watcher


def create_users(user_service: str, count: int) -> list[str]:
    """`count` new users, whose ids the orders take turns with."""
    with admin_channel(user_service) as channel:
        users = users_pb2_grpc.UserServiceStub(channel)
        return [
            users.CreateUser(
                users_pb2.CreateUserRequest(
                    email=f"bench.{uuid.uuid4().hex[:10]}@example.com", name="Bench"
                )
            ).id
            for _ in range(count)
        ]


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


def carries_retry_info(call: grpc.Call) -> bool:
    """Whether a refused call's google.rpc.Status details (trailer grpc-status-details-bin)
    include a RetryInfo."""
    for key, value in call.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            details = status_pb2.Status.FromString(value).details
            retry_info = error_details_pb2.RetryInfo.DESCRIPTOR.full_name
            return any(detail.TypeName() == retry_info for detail in details)
    return False


@dataclass
class SentOrders:
    """What an open-loop run sent: the orders accepted, and the calls refused by status code."""

    accepted: dict[str, tuple[float, orders_pb2.Order]] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)
    refused_with_retry_info: int = 0
    calls: int = 0
    unanswered: int = 0  # no reply within the wait for replies
    first_sent: float = 0.0  # time.monotonic()
    last_sent: float = 0.0

    @property
    def sent_per_second(self) -> float:
        return max(self.calls - 1, 1) / max(self.last_sent - self.first_sent, 1e-9)

    def record(self, sent_at: float, call: grpc.Future[orders_pb2.Order]) -> None:
        error = call.exception()
        if error is None:
            order = call.result()
            self.accepted[order.id] = (sent_at, order)
            return
        code = error.code() if isinstance(error, grpc.Call) else None
        self.refused[code.name if code is not None else type(error).__name__] += 1
        if isinstance(error, grpc.Call) and carries_retry_info(error):
            self.refused_with_retry_info += 1


def send_at_rate(
    orders: orders_pb2_grpc.OrderServiceStub,
    user_ids: list[str],
    count: int,
    rate: float,
    reply_timeout: float = 30.0,
) -> SentOrders:
    """Open loop: each order is sent at its scheduled time, whether or not earlier ones have
    returned (a slow reply must not lower the offered rate). Users take turns. Returns once
    every call has replied, or `reply_timeout` after the last was sent."""
    sent = SentOrders(calls=count)
    lock = threading.Lock()
    replies = threading.Semaphore(0)

    def on_reply(sent_at: float, call: grpc.Future[orders_pb2.Order]) -> None:
        with lock:
            sent.record(sent_at, call)
        replies.release()

    started = time.monotonic()
    for n in range(count):
        time.sleep(max(0.0, started + n / rate - time.monotonic()))
        request = orders_pb2.CreateOrderRequest(
            user_id=user_ids[n % len(user_ids)],
            amount=money_pb2.Money(currency_code="USD", units=10 + n % 90),
        )
        sent_at = time.monotonic()
        call = orders.CreateOrder.future(request, timeout=reply_timeout)
        call.add_done_callback(functools.partial(on_reply, sent_at))
        sent.first_sent = sent.first_sent or sent_at
        sent.last_sent = sent_at
    deadline = time.monotonic() + reply_timeout + 5
    answered = 0
    while answered < count and replies.acquire(timeout=max(0.0, deadline - time.monotonic())):
        answered += 1
    with lock:
        sent.unanswered = count - answered
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
    watcher = start_watcher(kafka)
    user_ids = create_users(user_service, user_count)
    with admin_channel(order_service) as order_channel:
        orders = orders_pb2_grpc.OrderServiceStub(order_channel)
        run = send_at_rate(orders, user_ids, orders_to_send, rate)
    sent = run.accepted

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
    last_seen = max(watcher.seen[i][0] for i in done)
    return E2eLatency(
        len(sent),
        len(done),
        percentiles(recorded),
        percentiles(observed),
        sent_per_second=run.sent_per_second,
        processed_per_second=len(done) / max(last_seen - run.first_sent, 1e-9),
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
        KafkaSettings.from_env(os.environ, tls_of("admin")),
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
