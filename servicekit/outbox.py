"""Transactional outbox: events are written in the same statement as the change they describe,
and an OutboxRelay publishes them to Kafka, deleting a row only once the broker has acknowledged
it. A crash anywhere loses nothing: unpublished rows are sent on the next start (possibly twice;
consumers deduplicate by event id).

Each service publishes the events it wrote (its CloudEvents source). Of its replicas exactly one
relay publishes at a time (a PostgreSQL advisory lock elects it, a lease and Kafka transactions
fence a leader that lost it: see OutboxRelay), so rows leave in id order and replicas never
publish the same row concurrently. The leader polls: often while rows keep coming,
less and less often while none do, and at once when a writer of its own process says it staged
an event (`OutboxWakeUp`). A NOTIFY trigger would wake it without polling, but every notifying
commit takes a database-wide lock held through commit, so notifying writers queue behind each
other and cannot share a WAL flush (half the insert rate).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg2
import psycopg2.extensions
from confluent_kafka import KafkaError, KafkaException, Producer
from sqlalchemy import Engine, text

from servicekit.db import libpq_dsn
from servicekit.kafka import Headers, cloudevent_headers, producer_config
from servicekit.metrics import EVENTS_PUBLISHED, OUTBOX_OLDEST_AGE, PUBLISH_FAILURES
from servicekit.settings import KafkaSettings, OutboxSettings
from servicekit.sql import Statement
from servicekit.tracing import TRACEPARENT, current_traceparent, publishing

log = logging.getLogger("servicekit.outbox")

# pg_advisory_lock(class, id) held by the publishing relay of a source: the class is any fixed
# 32-bit number unique to this use, the id the hash of the source.
RELAY_LOCK_CLASS = 0x6F7574  # "out"
_MAX_BACKOFF_SECONDS = 10.0
# How long the leader waits on Kafka at a time before it speaks to the database again.
_HEARTBEAT_SECONDS = 1.0
# While events keep coming, the relay looks for more at least every this many lingers.
_BUSY_POLLS_PER_LINGER = 4


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


def event_source(service_name: str) -> str:
    """The CloudEvents ce_source of the events a service writes; its relay publishes them."""
    return f"/ecommerce/{service_name}"


@dataclass(frozen=True)
class StagedEvent:
    """An event to write to the outbox with the change it announces, and the trace context of
    the call staging it (its trace goes on through Kafka)."""

    topic: str
    key: str
    source: str
    event: Event
    traceparent: str | None = field(default_factory=current_traceparent)


# The staged events of a statement, as a table: one array parameter per outbox column.
_STAGED = (
    "unnest(%(outbox_event_ids)s::uuid[], %(outbox_topics)s::text[], %(outbox_keys)s::text[],"
    " %(outbox_types)s::text[], %(outbox_sources)s::text[], %(outbox_payloads)s::bytea[],"
    " %(outbox_times)s::timestamptz[], %(outbox_traceparents)s::text[]) WITH ORDINALITY"
    " AS staged(event_id, topic, message_key, event_type, source, payload, occur_time,"
    " traceparent, position)"
)
_OUTBOX_COLUMNS = (
    "event_id, topic, message_key, event_type, source, payload, occur_time, traceparent"
)
_STAGED_COLUMNS = ", ".join(f"staged.{column}" for column in _OUTBOX_COLUMNS.split(", "))


def stage_events_if_any(inserted: str) -> str:
    """SQL ending a statement `WITH <inserted> AS (…) …`: writes the staged events iff `<inserted>`
    returned a row, in the same statement, so atomically with the change they announce and at
    the cost of no extra round trip. Returns one row per event; its parameters: `staged_params`."""
    return (
        f"INSERT INTO outbox_events ({_OUTBOX_COLUMNS}) SELECT {_STAGED_COLUMNS} FROM {_STAGED}"
        f" WHERE EXISTS (SELECT FROM {inserted}) ORDER BY staged.position RETURNING event_id"
    )


def stage_events_of(changed: str) -> str:
    """Like `stage_events_if_any`, for a statement that changes many rows: writes the staged events
    whose id is in `<changed>`'s `event_id` column, and returns their ids."""
    return (
        f"INSERT INTO outbox_events ({_OUTBOX_COLUMNS}) SELECT {_STAGED_COLUMNS} FROM {_STAGED}"
        f" JOIN {changed} ON {changed}.event_id = staged.event_id"
        f" ORDER BY staged.position RETURNING event_id"
    )


def staged_params(events: Sequence[StagedEvent]) -> dict[str, object]:
    """The parameters of the SQL of `stage_events_if_any` and `stage_events_of`."""
    return {
        "outbox_event_ids": [uuid.UUID(staged.event.event_id) for staged in events],
        "outbox_topics": [staged.topic for staged in events],
        "outbox_keys": [staged.key for staged in events],
        "outbox_types": [staged.event.DESCRIPTOR.full_name for staged in events],
        "outbox_sources": [staged.source for staged in events],
        "outbox_payloads": [staged.event.SerializeToString() for staged in events],
        "outbox_times": [staged.event.occur_time.ToDatetime(tzinfo=UTC) for staged in events],
        "outbox_traceparents": [staged.traceparent for staged in events],
    }


class OutboxWakeUp:
    """Lets the writers of a process wake the relays of the same process right after a commit."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def events_staged(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """True if woken before `timeout`; the wake-up is consumed."""
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken


# The one wake-up of this process: a relay elsewhere finds the events by polling.
wake_up = OutboxWakeUp()


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
    traceparent: str | None


SELECT_PENDING = Statement(
    "SELECT id, event_id, topic, message_key, event_type, source, payload, occur_time,"
    " traceparent FROM outbox_events WHERE source = %(source)s ORDER BY id LIMIT %(limit)s"
)
RELAY_SESSION_BOUNDS = (
    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3;"
    " SET tcp_user_timeout = 10000; SET statement_timeout = 30000"
)
DELETE_PUBLISHED = Statement("DELETE FROM outbox_events WHERE id = ANY(%(ids)s::bigint[])")
# The oldest is the first in id order: read through the (source, id) index, whatever the backlog.
OLDEST_UNPUBLISHED_AGE = text(
    "SELECT coalesce((SELECT extract(epoch FROM now() - occur_time) FROM outbox_events"
    " WHERE source = :source ORDER BY id LIMIT 1), 0)"
)


def oldest_unpublished_age(engine: Engine, source: str) -> float:
    """Seconds since the oldest unpublished event of `source` occurred (0 when none waits)."""
    with engine.connect() as connection:
        age = float(connection.execute(OLDEST_UNPUBLISHED_AGE, {"source": source}).scalar_one())
    OUTBOX_OLDEST_AGE.labels(source).set(age)
    return age


class OutboxRelay:
    """A background thread that publishes the committed outbox rows of one source to Kafka.

    Leadership is fenced twice. The database side is a lease: the leader's session ends when it
    has been idle for `leader_lease_seconds` (`idle_session_timeout`), and the leader is never
    idle that long (it polls and heartbeats more often), so a paused or cut-off leader loses the
    lock within the lease, and it checks that its session still holds it before each commit. The
    Kafka side: every batch is one transaction of the relays' shared `transactional.id`; a new
    leader's producer starts by fencing the previous one, whose open transaction is aborted and
    whose later commits fail, so a leader that wakes up after its lease publishes nothing that
    read_committed consumers (the processor) see."""

    def __init__(
        self,
        database_url: str,
        kafka: KafkaSettings,
        outbox: OutboxSettings,
        source: str,
        client_id: str,
        transactional_id: str,
    ) -> None:
        self._dsn = libpq_dsn(database_url)
        self._kafka = kafka
        self._outbox = outbox
        self._source = source
        self._client_id = client_id
        self._transactional_id = transactional_id
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self.published = 0  # events acknowledged by the broker, for logs and tests
        self.interruptions = 0  # times the relay had to start over

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finishes the batch in hand (its transaction is committed), then returns."""
        self._stopped.set()
        wake_up.events_staged()
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        """Supervises the relay: whatever interrupts it, it starts over after a backoff, with a
        new session and a new producer (after a fatal librdkafka error the old one is unusable)."""
        backoff = 0.5
        while not self._stopped.is_set():
            try:
                self._lead()
                backoff = 0.5
                continue
            except (psycopg2.Error, KafkaException, PublishFailed) as error:
                log.warning("outbox relay interrupted: %s", error, extra={"fields": {}})
            except Exception:
                # A bug, or a failure nobody foresaw: never the end of publishing.
                log.exception("outbox relay failed; starting over", extra={"fields": {}})
            self.interruptions += 1
            PUBLISH_FAILURES.labels(self._source).inc()
            self._stopped.wait(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)

    def _new_producer(self) -> Producer:
        return Producer(
            producer_config(
                self._kafka,
                self._client_id,
                **{
                    "transactional.id": self._transactional_id,
                    "message.timeout.ms": int(self._outbox.publish_timeout_seconds * 1000),
                    "linger.ms": 2,
                },
            )
        )

    def _lead(self) -> None:
        """Publishes while this relay holds the leader lock; returns when it cannot get it."""
        connection = self._connect()
        try:
            if not self._take_lock(connection):
                self._stopped.wait(self._outbox.poll_interval_seconds)
                return
            # Made in this thread, after any fork of the hosting process, once per leadership.
            producer = self._new_producer()
            try:
                # Fences the producers of earlier leaders: their open transaction is aborted.
                self._retry_while_leading(connection, producer.init_transactions)
                log.info("outbox relay leads", extra={"fields": {}})
                self._publish_while_leading(connection, producer)
            finally:
                producer.close()
        finally:
            connection.close()  # also releases the advisory lock

    def _connect(self) -> psycopg2.extensions.connection:
        connection = psycopg2.connect(
            self._dsn,
            connect_timeout=3,
            application_name=f"{self._client_id}-relay",
            # A database that vanished (host down, partition) is noticed within ~10 s.
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )
        connection.autocommit = True
        with connection.cursor() as cursor:
            # A delete lost in a crash only means the event is published again, which consumers
            # tolerate: the relay's cycle need not wait for the WAL flush.
            cursor.execute("SET synchronous_commit = off")
            # The other way round: a relay whose host vanished, or that stopped talking (paused),
            # loses its session and the lock within the lease; a statement that hangs ends.
            cursor.execute(RELAY_SESSION_BOUNDS)
            cursor.execute(
                "SET idle_session_timeout = %s", (int(self._outbox.leader_lease_seconds * 1000),)
            )
        return connection

    def _take_lock(self, connection: psycopg2.extensions.connection) -> bool:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (RELAY_LOCK_CLASS, self._source)
            )
            (is_leader,) = cursor.fetchone() or (False,)
        return bool(is_leader)

    def _publish_while_leading(
        self, connection: psycopg2.extensions.connection, producer: Producer
    ) -> None:
        prepared: set[str] = set()
        idle_wait = self._outbox.linger_seconds
        while True:
            published = self._publish_batch(connection, prepared, producer)
            if self._stopped.is_set():
                return  # after one last batch: what committed before the stop goes out
            if published == self._outbox.batch_size:
                continue  # more are waiting
            # Look again soon while events keep coming (writers of this process wake the relay at
            # once; others' events wait at most this), less and less often while none do.
            idle_wait = (
                _BUSY_POLLS_PER_LINGER * self._outbox.linger_seconds
                if published
                else min(idle_wait * 2, self._outbox.poll_interval_seconds)
            )
            if wake_up.wait(idle_wait):
                # Let the commits of a burst gather into one batch: one query, one transaction
                # and one delete for many events instead of one each.
                self._stopped.wait(self._outbox.linger_seconds)

    def _publish_batch(
        self,
        connection: psycopg2.extensions.connection,
        prepared: set[str],
        producer: Producer,
    ) -> int:
        with connection.cursor() as cursor:
            pending = {"source": self._source, "limit": self._outbox.batch_size}
            SELECT_PENDING.run(cursor, pending, prepared)
            batch = [PendingEvent(*row) for row in cursor.fetchall()]
        if not batch:
            return 0
        producer.begin_transaction()
        for event in batch:
            _produce(producer, event)
        _still_leading(connection)  # a successor may publish these already: never commit twice
        self._commit(connection, producer)
        with connection.cursor() as cursor:
            DELETE_PUBLISHED.run(cursor, {"ids": [event.id for event in batch]}, prepared)
        self.published += len(batch)
        EVENTS_PUBLISHED.labels(self._source).inc(len(batch))
        return len(batch)

    def _commit(self, connection: psycopg2.extensions.connection, producer: Producer) -> None:
        """Commits the batch's transaction (every message acknowledged by every in-sync replica),
        or aborts it and raises PublishFailed: its rows stay and are published again."""
        try:
            self._retry_while_leading(connection, producer.commit_transaction)
        except KafkaException as error:
            if not _kafka_error(error).txn_requires_abort():
                raise  # fatal (fenced by a newer leader) or Kafka gone too long: closing aborts
            producer.abort_transaction(self._outbox.publish_timeout_seconds)
            raise PublishFailed(f"transaction aborted: {error}") from error

    def _retry_while_leading(
        self, connection: psycopg2.extensions.connection, call: Callable[[float], None]
    ) -> None:
        """Calls `call(timeout)` again while Kafka times out, up to the publish timeout, keeping
        the session (and so the lease) alive meanwhile and giving up once it is lost."""
        deadline = time.monotonic() + self._outbox.publish_timeout_seconds
        while True:
            try:
                call(_HEARTBEAT_SECONDS)
                return
            except KafkaException as error:
                if not _kafka_error(error).retriable() or time.monotonic() > deadline:
                    raise
            _still_leading(connection)


class PublishFailed(Exception):
    """Kafka did not acknowledge some events; they stay unpublished and are retried."""


def _still_leading(connection: psycopg2.extensions.connection) -> None:
    """Raises psycopg2.Error when the session that holds the leader lock has ended (lease run
    out, partition): the lock went with it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _kafka_error(error: KafkaException) -> KafkaError:
    reason = error.args[0] if error.args else None
    return reason if isinstance(reason, KafkaError) else KafkaError(KafkaError._FAIL, str(error))


def _produce(producer: Producer, event: PendingEvent) -> None:
    # A short PRODUCER span, a child of the call that wrote the event; the consumer's is its child.
    with publishing(event.topic, event.traceparent) as traceparent:
        headers = _event_headers(event, traceparent)
        while True:
            try:
                producer.produce(
                    event.topic,
                    key=event.message_key.encode(),
                    value=bytes(event.payload),
                    headers=headers,
                )
                return
            except BufferError:
                producer.poll(0.1)  # the local queue is full: let it drain, then retry


def _event_headers(event: PendingEvent, traceparent: str | None) -> Headers:
    headers = cloudevent_headers(
        str(event.event_id), event.source, event.event_type, event.occur_time
    )
    return [*headers, (TRACEPARENT, traceparent.encode())] if traceparent else headers
