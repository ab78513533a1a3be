"""WatchOrder's feed: one Kafka consumer per process reads every OrderStatusChanged of the orders
topic and hands each to the watchers of its order. It joins no consumer group (it is assigned
every partition, from the end), so every replica sees every change and commits nothing. A watcher
is an asyncio queue on the server's event loop: an open stream holds no thread and no database
connection, and a thousand watchers cost a thousand small queues."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from confluent_kafka import OFFSET_END, Consumer, KafkaException, Message, TopicPartition
from ecommerce.events.v1 import events_pb2
from google.protobuf.message import DecodeError

from servicekit.kafka import header
from servicekit.settings import KafkaSettings

log = logging.getLogger("order_service.watch")

STATUS_CHANGED = events_pb2.OrderStatusChanged.DESCRIPTOR.full_name
_POLL_SECONDS = 0.5


class OrderFeed:
    """Status changes of orders, as the orders topic carries them, for whoever watches them."""

    def __init__(self, kafka: KafkaSettings, client_id: str) -> None:
        self._kafka = kafka
        self._client_id = client_id
        self._watchers: dict[str, set[_Watcher]] = defaultdict(set)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, order_id: uuid.UUID) -> Iterator[asyncio.Queue[events_pb2.OrderStatusChanged]]:
        """The changes of `order_id` from now on, while inside (enter before reading the order:
        a change committed after the read is then never missed)."""
        watcher = _Watcher(asyncio.get_running_loop(), asyncio.Queue())
        key = str(order_id)
        with self._lock:
            self._watchers[key].add(watcher)
        try:
            yield watcher.queue
        finally:
            with self._lock:
                self._watchers[key].discard(watcher)
                if not self._watchers[key]:
                    del self._watchers[key]

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(10)

    def start(self) -> None:
        """With the service: from then on, every change published is seen."""
        self._thread = threading.Thread(target=self._run, name="order-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        consumer = Consumer(
            self._kafka.client_config(
                **{
                    "client.id": f"{self._client_id}-order-feed",
                    # Required by the client; never used: this consumer joins no group.
                    "group.id": f"{self._client_id}-order-feed-{uuid.uuid4().hex[:8]}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                }
            )
        )
        try:
            self._assign_from_end(consumer)
            while not self._stopped.is_set():
                for message in consumer.consume(500, _POLL_SECONDS):
                    self._dispatch(message)
        except Exception:
            log.exception("the order feed stopped; watchers see no more changes", extra={})
        finally:
            consumer.close()

    def _assign_from_end(self, consumer: Consumer) -> None:
        topic = self._kafka.orders_topic
        while not self._stopped.is_set():
            try:
                partitions = consumer.list_topics(topic, timeout=5).topics[topic].partitions
            except KafkaException as error:
                log.warning("order feed waits for Kafka: %s", error, extra={})
                continue
            consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in partitions])
            return

    def _dispatch(self, message: Message) -> None:
        if not self._watchers:
            # Nobody watches: not worth decoding. A watcher that registers just after reads the
            # order after this change committed, so it misses nothing.
            return
        if message.error() is not None or header(message.headers(), "ce_type") != STATUS_CHANGED:
            return
        change = events_pb2.OrderStatusChanged()
        try:
            change.ParseFromString(message.value() or b"")
        except DecodeError:
            return  # the processor dead-letters it; nobody watches an undecodable change
        with self._lock:
            watchers = list(self._watchers.get(change.order_id, ()))
        for watcher in watchers:
            watcher.loop.call_soon_threadsafe(watcher.queue.put_nowait, change)


class _Watcher(NamedTuple):
    """Where a watcher's changes go: its queue, on the event loop that reads it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[events_pb2.OrderStatusChanged]
