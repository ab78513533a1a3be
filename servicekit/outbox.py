"""Transactional outbox: events are written in the same transaction as the change they describe,
and an OutboxRelay publishes them to Kafka, marking a row published only once the broker has
acknowledged it. A crash anywhere loses nothing: unpublished rows are sent on the next start
(possibly twice; consumers deduplicate by event id).

Exactly one relay publishes at a time (a PostgreSQL advisory lock elects it), so rows leave in
id order and several replicas of a service never publish the same row concurrently. The leader
waits on LISTEN `outbox_events` (a trigger notifies at commit), with a slow poll as a fallback.
"""

from __future__ import annotations

import logging
import select
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg2
import psycopg2.extensions
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from sqlalchemy import make_url

from servicekit.kafka import cloudevent_headers, producer_config
from servicekit.settings import KafkaSettings, OutboxSettings

log = logging.getLogger("servicekit.outbox")

NOTIFY_CHANNEL = "outbox_events"
# pg_advisory_lock key held by the publishing relay: any fixed 64-bit number unique to this use.
RELAY_LOCK_KEY = 0x6F7574626F78  # "outbox"
_CLEANUP_EVERY_SECONDS = 60.0
_CLEANUP_BATCH = 10_000
_MAX_BACKOFF_SECONDS = 10.0


class Event(Protocol):
    """What every message of ecommerce.events.v1 has."""

    event_id: str

    @property
    def occur_time(self) -> Any: ...

    @property
    def DESCRIPTOR(self) -> Any: ...

    def SerializeToString(self) -> bytes: ...


def new_event_id() -> str:
    return str(uuid.uuid4())


_OUTBOX_COLUMNS = "event_id, topic, message_key, event_type, source, payload, occur_time"
_EVENT_VALUES = (
    "%(event_id)s::uuid, %(event_topic)s, %(event_key)s, %(event_type)s, %(event_source)s,"
    " %(event_payload)s, %(event_time)s"
)


def stage_event_after(inserted: str) -> str:
    """The INSERT of an event into the outbox, to end a statement `WITH <inserted> AS (…) …`:
    the event is staged iff `<inserted>` returned a row, in the same statement, so atomically
    with the change it announces and at the cost of no extra round trip.
    Returns the outbox row's id; takes the parameters of `event_params`."""
    return (
        f"INSERT INTO outbox_events ({_OUTBOX_COLUMNS})"
        f" SELECT {_EVENT_VALUES} FROM {inserted} RETURNING id"
    )


def event_params(*, topic: str, key: str, source: str, event: Event) -> dict[str, object]:
    return {
        "event_id": event.event_id,
        "event_topic": topic,
        "event_key": key,
        "event_type": event.DESCRIPTOR.full_name,
        "event_source": source,
        "event_payload": event.SerializeToString(),
        "event_time": event.occur_time.ToDatetime(tzinfo=UTC),
    }


@dataclass(frozen=True)
class PendingEvent:
    id: int
    event_id: uuid.UUID
    topic: str
    message_key: str
    event_type: str
    source: str
    payload: bytes
    occur_time: datetime


class OutboxRelay:
    """A background thread that publishes committed outbox rows to Kafka."""

    def __init__(
        self,
        database_url: str,
        kafka: KafkaSettings,
        outbox: OutboxSettings,
        client_id: str,
    ) -> None:
        self._connect_args = make_url(database_url).translate_connect_args(
            username="user", database="dbname"
        )
        self._kafka = kafka
        self._outbox = outbox
        self._client_id = client_id
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._last_cleanup = 0.0
        self.published = 0  # events acknowledged by the broker, for logs and tests

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finishes the batch in hand (its deliveries are awaited), then returns."""
        self._stopped.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        # The producer is made in this thread, after any fork of the hosting process.
        producer = Producer(
            producer_config(
                self._kafka,
                self._client_id,
                **{
                    "message.timeout.ms": int(self._outbox.publish_timeout_seconds * 1000),
                    "linger.ms": 2,
                },
            )
        )
        backoff = 0.5
        while not self._stopped.is_set():
            try:
                self._lead(producer)
                backoff = 0.5
            except (psycopg2.Error, KafkaException, PublishFailed) as error:
                log.warning("outbox relay interrupted: %s", error, extra={"fields": {}})
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
        producer.flush(self._outbox.publish_timeout_seconds)

    def _lead(self, producer: Producer) -> None:
        """Publishes while this relay holds the leader lock; returns when it cannot get it."""
        connection = psycopg2.connect(
            **self._connect_args, connect_timeout=3, application_name=f"{self._client_id}-relay"
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                # A publish mark lost in a crash only means the event is published again, which
                # consumers tolerate: the relay's cycle need not wait for the WAL flush.
                cursor.execute("SET synchronous_commit = off")
                cursor.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LOCK_KEY,))
                (is_leader,) = cursor.fetchone() or (False,)
                if not is_leader:
                    self._stopped.wait(self._outbox.poll_interval_seconds)
                    return
                cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
            log.info("outbox relay leads", extra={"fields": {}})
            while True:
                published = self._publish_batch(connection, producer)
                if self._stopped.is_set():
                    return  # after one last batch: what committed before the stop goes out
                if published == self._outbox.batch_size:
                    continue  # more are waiting
                self._clean_up_if_due(connection)
                _wait_for_notification(connection, self._outbox.poll_interval_seconds)
                # Let the commits of a burst gather into one batch: one query, one produce
                # request and one mark for many events instead of one each.
                self._stopped.wait(self._outbox.linger_seconds)
        finally:
            connection.close()  # also releases the advisory lock

    def _publish_batch(self, connection: psycopg2.extensions.connection, producer: Producer) -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT id, event_id, topic, message_key, event_type, source, payload, occur_time"
                " FROM outbox_events WHERE publish_time IS NULL ORDER BY id LIMIT %s",
                (self._outbox.batch_size,),
            )
            batch = [PendingEvent(*row) for row in cursor.fetchall()]
        if not batch:
            return 0
        acknowledged, failures = _deliver(producer, batch, self._outbox.publish_timeout_seconds)
        if acknowledged:
            with connection.cursor() as cursor:
                cursor.execute(
                    "UPDATE outbox_events SET publish_time = now() WHERE id = ANY(%s)",
                    (acknowledged,),
                )
            self.published += len(acknowledged)
        if failures:
            raise PublishFailed(
                f"{len(failures)} of {len(batch)} events not acknowledged: {failures[0]}"
            )
        return len(batch)

    def _clean_up_if_due(self, connection: psycopg2.extensions.connection) -> None:
        if time.monotonic() - self._last_cleanup < _CLEANUP_EVERY_SECONDS:
            return
        self._last_cleanup = time.monotonic()
        with connection.cursor() as cursor:
            cursor.execute(
                "DELETE FROM outbox_events WHERE id IN ("
                " SELECT id FROM outbox_events"
                " WHERE publish_time < now() - make_interval(secs => %s) LIMIT %s)",
                (self._outbox.retention_seconds, _CLEANUP_BATCH),
            )
            if cursor.rowcount:
                log.info("outbox cleaned", extra={"fields": {"deleted": cursor.rowcount}})


class PublishFailed(Exception):
    """Kafka did not acknowledge some events; they stay unpublished and are retried."""


def _deliver(
    producer: Producer, batch: list[PendingEvent], timeout: float
) -> tuple[list[int], list[KafkaError]]:
    """Produces the batch in order and waits for every delivery report."""
    acknowledged: list[int] = []
    failures: list[KafkaError] = []

    def report(row_id: int) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                acknowledged.append(row_id)
            else:
                failures.append(error)

        return on_delivery

    for event in batch:
        _produce(producer, event, report(event.id))
    # Every message times out within `timeout` at the latest, so this waits for every report.
    remaining = producer.flush(timeout + 5)
    if remaining:
        failures.append(KafkaError(KafkaError._TIMED_OUT, f"{remaining} deliveries still pending"))
    return acknowledged, failures


def _produce(
    producer: Producer,
    event: PendingEvent,
    on_delivery: Callable[[KafkaError | None, Message], None],
) -> None:
    while True:
        try:
            producer.produce(
                event.topic,
                key=event.message_key.encode(),
                value=bytes(event.payload),
                headers=cloudevent_headers(
                    str(event.event_id), event.source, event.event_type, event.occur_time
                ),
                on_delivery=on_delivery,
            )
            return
        except BufferError:
            producer.poll(0.1)  # the local queue is full: serve delivery reports, then retry


def _wait_for_notification(connection: psycopg2.extensions.connection, timeout: float) -> None:
    if select.select([connection], [], [], timeout)[0]:
        connection.poll()
        connection.notifies.clear()
