"""The consume loop: at-least-once, one poison message never stalls a partition.

An offset is stored for commit only after the message's outcome is applied (the order updated,
the event skipped, or the message safely in the DLQ), so a crash redelivers, never loses, and
a status change being idempotent makes a redelivery change nothing.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry import trace
from opentelemetry.trace import Span

from ecommerce_client.errors import failure_of
from processor.rules import OrderRule
from servicekit.errors import status_code
from servicekit.kafka import copy_and_wait, header, headers_without, position, producer_config
from servicekit.metrics import (
    CONSUMER_LAG,
    CONSUMER_REBALANCES,
    DEAD_LETTERS,
    PROCESSOR_OUTCOMES,
)
from servicekit.retry import TRANSIENT_CODES, call_with_retry
from servicekit.settings import KafkaSettings
from servicekit.tracing import TRACEPARENT, consuming, for_many

log = logging.getLogger("processor")

ORDER_CREATED = events_pb2.OrderCreated.DESCRIPTOR.full_name
ORDER_STATUS_CHANGED = events_pb2.OrderStatusChanged.DESCRIPTOR.full_name
# A server that is shutting down cancels the calls it has not started yet: to the processor, which
# never cancels its own calls, CANCELLED is as transient as UNAVAILABLE.
# What order_service answers a settlement of an order whose status is already final (settled
# by an earlier decision, or cancelled by its owner).
FINAL_STATUS_REASON = "ORDER_STATUS_TRANSITION_NOT_ALLOWED"
TRANSIENT_FOR_CALLBACK = TRANSIENT_CODES | {grpc.StatusCode.CANCELLED}
# The callback is retried on these; only the transient ones are never given up on.
RETRYABLE_CODES = TRANSIENT_FOR_CALLBACK | {grpc.StatusCode.NOT_FOUND}
DLQ_HEADER_PREFIX = "dlq_"
LAG_INTERVAL_SECONDS = 5.0
# The consumer's session: a member that died without leaving holds its partitions until this
# expires (the broker's minimum is 6 s). max.poll.interval.ms may not be shorter.
SESSION_TIMEOUT_MS = 10_000
POLL_TIMEOUT_SECONDS = 0.5


@dataclass(frozen=True)
class DeadLetter:
    """Why a message cannot be handled: goes to the DLQ with these as headers."""

    reason: str
    error: str


def worst_loop_turn_seconds(callback_timeout: float, callback_retry_seconds: float) -> float:
    """The longest a loop turn can keep the consumer from polling, its dead letters aside: the
    callback's attempts and NOT_FOUND retries share one deadline of `callback_retry_seconds`;
    the attempt running at the deadline and one last attempt without retry take a timeout each."""
    return callback_retry_seconds + 2 * callback_timeout


def consumer_config(kafka: KafkaSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    return kafka.client_config(
        **{
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            # Offsets are stored by hand after the outcome is applied; auto-commit only commits
            # what has been stored.
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "auto.commit.interval.ms": 1000,
            # A member that does not poll for this long is evicted and its partitions reassigned.
            "max.poll.interval.ms": 300_000,
            # Keep the pause after a crash short.
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": 2_000,
            **overrides,
        }
    )


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


@dataclass(frozen=True)
class Settle:
    """The order's outcome, to be applied by the order service."""

    change: orders_pb2.UpdateOrderStatusRequest


class Done:
    """Nothing (more) to do for the message."""


class RetryLater:
    """Not settled yet (the order service stayed unreachable, or the processor is stopping):
    leave the offset, read the message again."""


DONE = Done()
RETRY_LATER = RetryLater()


def _outcome(decision: Decision, result: Result | Decision) -> str:
    """The metric label of what became of a message."""
    if isinstance(result, RetryLater):
        return "retry_later"
    if isinstance(result, DeadLetter):
        return "dead_lettered"
    if isinstance(decision, Settle):
        processed = decision.change.status == orders_pb2.ORDER_STATUS_PROCESSED
        return "processed" if processed else "failed"
    return "skipped"  # an event the processor has nothing to do for


Decision = Settle | DeadLetter | Done
# What became of a message once its decision was carried out.
Result = Done | DeadLetter | RetryLater
EventHandler = Callable[["OrderEventProcessor", Message], Decision]


class OrderEventProcessor:
    """Consumes the orders topic and applies the rule's outcome to each created order, settling
    a whole batch of orders with one BatchUpdateOrderStatus call."""

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
        batch_size: int = 200,
        batch_linger_seconds: float = 0.005,
    ) -> None:
        self._consumer = consumer
        self._orders = orders
        self._rule = rule
        self._dead_letters = dead_letters
        self._callback_timeout = callback_timeout
        self._callback_retry_seconds = callback_retry_seconds
        self._stop = stop
        self._batch_size = batch_size
        self._batch_linger_seconds = batch_linger_seconds
        self.handled = 0
        self.membership = GroupMembership()
        self.last_progress = time.monotonic()  # the end of the loop's latest turn
        # The longest time the loop spent between two polls: what max.poll.interval.ms bounds.
        self.longest_poll_gap_seconds = 0.0
        self._lag_recorded = 0.0

    def subscribe(self, topic: str) -> None:
        """Joins the consumer group on `topic`, counting rebalances in `membership`."""
        self._consumer.subscribe(
            [topic],
            on_assign=self.membership.on_assign,
            on_revoke=self.membership.on_revoke,
            on_lost=self.membership.on_lost,
        )

    def run(self) -> None:
        """Consumes until `stop` is set; then commits what was applied."""
        polled: float | None = None  # when the latest poll returned
        while not self._stop.is_set():
            if polled is not None:
                gap = time.monotonic() - polled
                self.longest_poll_gap_seconds = max(self.longest_poll_gap_seconds, gap)
            batch = []
            messages = self._next_batch()
            polled = time.monotonic()
            for message in messages:
                error = message.error()
                if error is None:
                    batch.append(message)
                else:
                    self._log_consumer_error(error)
            if batch:
                self._advance(batch, self._handle_batch(batch))
            self.last_progress = time.monotonic()
            if self.last_progress - self._lag_recorded >= LAG_INTERVAL_SECONDS:
                self._record_lag()
        self._commit()

    def _record_lag(self) -> None:
        """Per assigned partition, how far behind its end this consumer reads (from the
        watermarks the last fetch brought: no request to the broker)."""
        self._lag_recorded = time.monotonic()
        try:
            assigned = self._consumer.position(self._consumer.assignment())
        except KafkaException:
            return  # a rebalance in progress: next time
        for partition in assigned:
            low, high = self._consumer.get_watermark_offsets(partition, cached=True)
            # Nothing read yet from the partition: all of it is to be read (earliest).
            position = partition.offset if partition.offset >= 0 else low
            if high >= 0 and position >= 0:
                lag = CONSUMER_LAG.labels(partition.topic, str(partition.partition))
                lag.set(max(high - position, 0))

    def _next_batch(self) -> list[Message]:
        """What arrives within a short linger after the first message, up to batch_size: one
        callback settles them all."""
        first = self._consumer.poll(POLL_TIMEOUT_SECONDS)
        if first is None:
            return []
        rest = self._consumer.consume(self._batch_size - 1, timeout=self._batch_linger_seconds)
        return [first, *rest]

    def _handle_batch(self, batch: list[Message]) -> set[int]:
        """Carries out each message's decision; returns the indexes (in `batch`) of the messages
        that were handled (not to be read again)."""
        spans = [consuming(position(m).topic, header(m.headers(), TRACEPARENT)) for m in batch]
        try:
            decisions = [self._decide(message) for message in batch]
            settled = self._settle_batch(decisions, spans)
            handled = set()
            for index, decision in enumerate(decisions):
                with trace.use_span(spans[index]):
                    if self._apply(batch[index], decision, settled.get(index, decision)):
                        handled.add(index)
            return handled
        finally:
            for span in spans:
                span.end()

    def _settle_batch(self, decisions: list[Decision], spans: list[Span]) -> dict[int, Result]:
        changes = {index: d.change for index, d in enumerate(decisions) if isinstance(d, Settle)}
        if not changes:
            return {}
        # One callback for the batch: its span continues the first event's trace and links every
        # event's; each event's own log lines are written in its own trace (_handle_batch).
        with for_many("settle orders", [spans[index] for index in changes]):
            return self._settle(changes)

    def _apply(self, message: Message, decision: Decision, result: Result | Decision) -> bool:
        """Records what became of one message; whether it was handled (not to be read again)."""
        PROCESSOR_OUTCOMES.labels(_outcome(decision, result)).inc()
        if isinstance(result, RetryLater):
            return False
        if isinstance(result, DeadLetter):
            DEAD_LETTERS.labels(result.reason).inc()
            self._dead_letters.send(message, result)
        elif isinstance(decision, Settle):
            _log_settled(decision.change)
        return True

    def _decide(self, message: Message) -> Decision:
        event_type = header(message.headers(), "ce_type")
        if event_type is None:
            return DeadLetter("MISSING_CE_TYPE", "no ce_type header")
        handler = EVENT_HANDLERS.get(event_type)
        if handler is None:
            return DeadLetter("UNKNOWN_EVENT_TYPE", f"ce_type {event_type!r} is not handled here")
        return handler(self, message)

    def decide_order_created(self, message: Message) -> Decision:
        try:
            event = events_pb2.OrderCreated.FromString(message.value() or b"")
        except DecodeError as error:
            return DeadLetter("UNDECODABLE", f"not an {ORDER_CREATED}: {error}")
        order = event.order
        if not order.id or not order.HasField("amount"):
            return DeadLetter("INVALID_EVENT", "OrderCreated without an order id or amount")
        try:
            outcome = self._rule.decide(order)
        except Exception as error:  # the rule is pluggable: its failure is this message's
            return DeadLetter("RULE_FAILED", repr(error))
        return Settle(
            orders_pb2.UpdateOrderStatusRequest(
                id=order.id, status=outcome.status, reason=outcome.reason
            )
        )

    def ignore(self, _message: Message) -> Decision:
        return DONE

    def _settle(self, changes: dict[int, orders_pb2.UpdateOrderStatusRequest]) -> dict[int, Result]:
        """Applies the changes (message index -> change) with one call per attempt; orders not
        found yet (their row may lag behind their event) are tried again until
        CALLBACK_RETRY_SECONDS, the one deadline of every attempt and retry of the batch."""
        by_order: dict[str, list[int]] = defaultdict(list)  # a redelivered event: same order
        for index, change in changes.items():
            by_order[change.id].append(index)
        pending = {order_id: changes[indexes[0]] for order_id, indexes in by_order.items()}
        outcomes: dict[str, Result] = {}
        deadline = time.monotonic() + self._callback_retry_seconds
        delay = 0.05
        while pending:
            not_found = self._settle_once(pending, outcomes, deadline)
            pending = {order_id: pending[order_id] for order_id in not_found}
            if pending:
                # Full jitter, as servicekit.retry, never past the deadline.
                left = max(deadline - time.monotonic(), 0.0)
                self._stop.wait(min(random.uniform(0, delay), left))
                delay = min(delay * 2, 2.0)
        return {index: outcomes[order_id] for order_id, ids in by_order.items() for index in ids}

    def _settle_once(
        self,
        pending: dict[str, orders_pb2.UpdateOrderStatusRequest],
        outcomes: dict[str, Result],
        deadline: float,
    ) -> list[str]:
        """One batch call (retried while transient, until `deadline`); records each order's
        result and returns the orders to try again."""
        may_retry = time.monotonic() < deadline
        request = orders_pb2.BatchUpdateOrderStatusRequest(requests=list(pending.values()))
        try:
            response = call_with_retry(
                self._orders.BatchUpdateOrderStatus,
                request,
                retryable=TRANSIENT_FOR_CALLBACK,
                attempt_timeout=self._callback_timeout,
                give_up_after=max(deadline - time.monotonic(), 0.0),
                stop=self._stop,
            )
        except grpc.RpcError as error:
            failed: Result = (
                RETRY_LATER
                if error.code() in TRANSIENT_FOR_CALLBACK
                else DeadLetter(f"CALLBACK_{error.code().name}", error.details() or "")
            )
            outcomes.update(dict.fromkeys(pending, failed))
            return []
        retry = []
        for order_id, result in zip(pending, response.results, strict=True):
            if result.HasField("order") or _already_final(result.error):
                outcomes[order_id] = DONE
                continue
            code = status_code(result.error.code)
            if code in RETRYABLE_CODES and self._stop.is_set():
                outcomes[order_id] = RETRY_LATER  # the next owner of the partition tries again
            elif code in RETRYABLE_CODES and may_retry:
                retry.append(order_id)
            elif code in TRANSIENT_FOR_CALLBACK:
                outcomes[order_id] = RETRY_LATER
            else:
                outcomes[order_id] = DeadLetter(f"CALLBACK_{code.name}", result.error.message)
        return retry

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


# What each event type of the orders topic means to the processor; any other type is dead-lettered.
EVENT_HANDLERS: dict[str, EventHandler] = {
    ORDER_CREATED: OrderEventProcessor.decide_order_created,
    ORDER_STATUS_CHANGED: OrderEventProcessor.ignore,
}


def _log_settled(change: orders_pb2.UpdateOrderStatusRequest) -> None:
    """One line per settled event, in the trace of the order's creation."""
    log.info(
        "order processed",
        extra={
            "fields": {
                "order_id": change.id,
                "status": orders_pb2.OrderStatus.Name(change.status),
            }
        },
    )


class GroupMembership:
    """The consumer's rebalance callbacks, counting each kind of change: partitions lost mean the
    member was evicted (it polled too late, or its session expired) and another owns them now."""

    def __init__(self) -> None:
        self.assigned = 0
        self.revoked = 0
        self.lost = 0

    def on_assign(self, _consumer: Consumer, _partitions: list[TopicPartition]) -> None:
        self.assigned += 1
        CONSUMER_REBALANCES.labels("assigned").inc()

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.revoked += 1
        CONSUMER_REBALANCES.labels("revoked").inc()
        commit_on_revoke(consumer, partitions)

    def on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Nothing to commit: the offsets belong to the partitions' new owner."""
        self.lost += 1
        CONSUMER_REBALANCES.labels("lost").inc()
        log.warning(
            "partitions lost: evicted from the group",
            extra={"fields": {"partitions": [f"{p.topic}/{p.partition}" for p in partitions]}},
        )


def commit_on_revoke(consumer: Consumer, partitions: list[TopicPartition]) -> None:
    """Before partitions move to another instance, commit what was applied on them."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as error:
        if error.args[0].code() != KafkaError._NO_OFFSET:
            log.warning("commit on revoke failed: %s", error)


def _already_final(error: status_pb2.Status) -> bool:
    """The order was settled or cancelled before this decision reached it: nothing left to do
    (its event is no poison, so no dead letter)."""
    failure = failure_of(error)
    return (
        failure.code == grpc.StatusCode.FAILED_PRECONDITION
        and failure.reason == FINAL_STATUS_REASON
    )
