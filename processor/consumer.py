"""The consume loop: at-least-once, one poison message never stalls a partition.

An offset is stored for commit only after the message's outcome is applied (the order updated,
the event skipped, or the message safely in the DLQ), so a crash redelivers, never loses, and
UpdateOrderStatus being idempotent makes a redelivery change nothing.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc
from google.protobuf.message import DecodeError

from processor.rules import OrderRule
from servicekit.kafka import copy_and_wait, header, headers_without, position, producer_config
from servicekit.retry import TRANSIENT_CODES, call_with_retry
from servicekit.settings import KafkaSettings

log = logging.getLogger("processor")

ORDER_CREATED = events_pb2.OrderCreated.DESCRIPTOR.full_name
# Events on the orders topic that are not the processor's to act on.
IGNORED_TYPES = frozenset({events_pb2.OrderStatusChanged.DESCRIPTOR.full_name})
# A server that is shutting down cancels the calls it has not started yet: to the processor, which
# never cancels its own calls, CANCELLED is as transient as UNAVAILABLE.
TRANSIENT_FOR_CALLBACK = TRANSIENT_CODES | {grpc.StatusCode.CANCELLED}
# The callback is retried on these; only the transient ones are never given up on.
RETRYABLE_CODES = TRANSIENT_FOR_CALLBACK | {grpc.StatusCode.NOT_FOUND}
DLQ_HEADER_PREFIX = "dlq_"


@dataclass(frozen=True)
class DeadLetter:
    """Why a message cannot be handled: goes to the DLQ with these as headers."""

    reason: str
    error: str


class RetryLater(Exception):
    """The order service stayed unreachable: leave the offset, read the message again."""


def consumer_config(kafka: KafkaSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": kafka.bootstrap_servers,
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        # Offsets are stored by hand after the outcome is applied; auto-commit only commits
        # what has been stored.
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        "auto.commit.interval.ms": 1000,
        "max.poll.interval.ms": 300_000,
        # A member that died without leaving holds its partitions until this expires: keep the
        # pause after a crash short (the broker's minimum is 6 s).
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 2_000,
        **overrides,
    }


class DeadLetterQueue:
    """Publishes messages that cannot be handled to the DLQ topic, and waits for the ack."""

    def __init__(self, kafka: KafkaSettings, group_id: str) -> None:
        self._topic = kafka.orders_dlq_topic
        self._group_id = group_id
        self._producer = Producer(producer_config(kafka, f"{group_id}-dlq"))

    def send(self, message: Message, letter: DeadLetter) -> None:
        where = position(message)
        headers = headers_without(message.headers(), DLQ_HEADER_PREFIX)
        headers += [
            ("dlq_reason", letter.reason.encode()),
            ("dlq_error", letter.error[:2000].encode()),
            ("dlq_original_topic", where.topic.encode()),
            ("dlq_original_partition", str(where.partition).encode()),
            ("dlq_original_offset", str(where.offset).encode()),
            ("dlq_consumer_group", self._group_id.encode()),
            ("dlq_time", datetime.now(UTC).isoformat().encode()),
        ]
        copy_and_wait(self._producer, message, self._topic, headers)
        log.warning(
            "message dead-lettered",
            extra={
                "fields": {
                    "reason": letter.reason,
                    "error": letter.error,
                    "topic": where.topic,
                    "partition": where.partition,
                    "offset": where.offset,
                }
            },
        )

    def close(self) -> None:
        self._producer.flush(10)


class OrderEventProcessor:
    """Consumes the orders topic and applies the rule's outcome to each created order."""

    def __init__(
        self,
        consumer: Consumer,
        orders: orders_pb2_grpc.OrderServiceStub,
        rule: OrderRule,
        dead_letters: DeadLetterQueue,
        *,
        callback_timeout: float,
        callback_retry_seconds: float,
        stop: threading.Event,
        concurrency: int = 8,
        batch_size: int = 200,
    ) -> None:
        self._consumer = consumer
        self._orders = orders
        self._rule = rule
        self._dead_letters = dead_letters
        self._callback_timeout = callback_timeout
        self._callback_retry_seconds = callback_retry_seconds
        self._stop = stop
        self._batch_size = batch_size
        self._workers = ThreadPoolExecutor(concurrency, thread_name_prefix="order-callback")
        self.handled = 0

    def run(self) -> None:
        """Consumes until `stop` is set; then commits what was applied."""
        try:
            while not self._stop.is_set():
                batch = []
                for message in self._next_batch():
                    error = message.error()
                    if error is None:
                        batch.append(message)
                    else:
                        self._log_consumer_error(error)
                if batch:
                    self._advance(batch, self._handle_batch(batch))
        finally:
            self._workers.shutdown(wait=True)
        self._commit()

    def _next_batch(self) -> list[Message]:
        """What has arrived, up to batch_size, as soon as there is something. (`consume` with a
        timeout waits for a full batch or the timeout: half a second per order at low rates.)"""
        first = self._consumer.poll(0.5)
        if first is None:
            return []
        return [first, *self._consumer.consume(self._batch_size - 1, timeout=0)]

    def _handle_batch(self, batch: list[Message]) -> set[int]:
        """Handles the batch, one key's messages in order and different keys concurrently;
        returns the indexes (in `batch`) of the messages that were handled."""
        by_key: dict[bytes | None, list[int]] = defaultdict(list)
        for index, message in enumerate(batch):
            by_key[message.key()].append(index)
        handled: set[int] = set()
        for done in self._workers.map(
            lambda indexes: self._handle_in_order(batch, indexes), by_key.values()
        ):
            handled.update(done)
        return handled

    def _handle_in_order(self, batch: list[Message], indexes: list[int]) -> list[int]:
        done = []
        for index in indexes:
            try:
                self._handle(batch[index])
            except RetryLater:
                break  # this key waits: its later messages must not overtake this one
            done.append(index)
        return done

    def _advance(self, batch: list[Message], handled: set[int]) -> None:
        """Stores, per partition, the offset after the longest handled prefix; a partition with a
        message left over is rewound to it (what came after is handled again: a no-op)."""
        by_partition: dict[tuple[str, int], list[tuple[int, Message]]] = defaultdict(list)
        for index, message in enumerate(batch):
            where = position(message)
            by_partition[(where.topic, where.partition)].append((index, message))
        for (topic, partition), entries in by_partition.items():
            entries.sort(key=lambda entry: position(entry[1]).offset)
            next_offset = None
            for index, message in entries:
                if index not in handled:
                    self._rewind(message)
                    break
                next_offset = position(message).offset + 1
            if next_offset is not None:
                self._store(TopicPartition(topic, partition, next_offset))
        self.handled += len(handled)

    def _store(self, partition: TopicPartition) -> None:
        try:
            self._consumer.store_offsets(offsets=[partition])
        except KafkaException as error:
            # Revoked meanwhile: its new owner handles those messages again (a no-op).
            log.info("offset not stored: %s", error)

    def _handle(self, message: Message) -> None:
        outcome = self._apply(message)
        if isinstance(outcome, DeadLetter):
            self._dead_letters.send(message, outcome)

    def _apply(self, message: Message) -> DeadLetter | None:
        event_type = header(message.headers(), "ce_type")
        if event_type in IGNORED_TYPES:
            return None
        if event_type is None:
            return DeadLetter("MISSING_CE_TYPE", "no ce_type header")
        if event_type != ORDER_CREATED:
            return DeadLetter("UNKNOWN_EVENT_TYPE", f"ce_type {event_type!r} is not handled here")
        try:
            event = events_pb2.OrderCreated.FromString(message.value() or b"")
        except DecodeError as error:
            return DeadLetter("UNDECODABLE", f"not an {ORDER_CREATED}: {error}")
        if not event.order.id or not event.order.HasField("amount"):
            return DeadLetter("INVALID_EVENT", "OrderCreated without an order id or amount")
        return self._apply_outcome(event.order)

    def _apply_outcome(self, order: orders_pb2.Order) -> DeadLetter | None:
        try:
            outcome = self._rule.decide(order)
        except Exception as error:  # the rule is pluggable: its failure is this message's
            return DeadLetter("RULE_FAILED", repr(error))
        request = orders_pb2.UpdateOrderStatusRequest(
            id=order.id, status=outcome.status, reason=outcome.reason
        )
        try:
            call_with_retry(
                self._orders.UpdateOrderStatus,
                request,
                retryable=RETRYABLE_CODES,
                attempt_timeout=self._callback_timeout,
                give_up_after=self._callback_retry_seconds,
                stop=self._stop,
            )
        except grpc.RpcError as error:
            if error.code() in TRANSIENT_FOR_CALLBACK:
                raise RetryLater from error
            return DeadLetter(f"CALLBACK_{error.code().name}", error.details() or "")
        log.info(
            "order processed",
            extra={
                "fields": {
                    "order_id": order.id,
                    "status": orders_pb2.OrderStatus.Name(outcome.status),
                }
            },
        )
        return None

    def _rewind(self, message: Message) -> None:
        """Read the message again on a later poll (polling keeps this consumer in the group)."""
        where = position(message)
        try:
            self._consumer.seek(TopicPartition(where.topic, where.partition, where.offset))
        except KafkaException as error:
            # The partition was revoked meanwhile: its new owner reads the message instead.
            log.info("rewind skipped: %s", error)

    def _commit(self) -> None:
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as error:
            if error.args[0].code() != KafkaError._NO_OFFSET:
                raise

    @staticmethod
    def _log_consumer_error(error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        log.warning("consumer error: %s", error)
        if error.fatal():
            raise KafkaException(error)


def commit_on_revoke(consumer: Consumer, partitions: list[TopicPartition]) -> None:
    """Before partitions move to another instance, commit what was applied on them."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as error:
        if error.args[0].code() != KafkaError._NO_OFFSET:
            log.warning("commit on revoke failed: %s", error)
