"""Kafka plumbing shared by the services and the processor: client configs, CloudEvents headers
(binary content mode of the Kafka protocol binding) and topic creation."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._acl import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
)
from confluent_kafka.admin._resource import ResourcePatternType, ResourceType
from confluent_kafka.cimpl import NewTopic

from servicekit.settings import KafkaSettings

log = logging.getLogger("servicekit.kafka")

Headers = list[tuple[str, str | bytes | None]]
# What confluent-kafka hands back for a message's headers.
MessageHeaders = dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]] | None

CONTENT_TYPE = "application/protobuf"
CLOUDEVENTS_SPEC_VERSION = "1.0"


def producer_config(settings: KafkaSettings, client_id: str, **overrides: Any) -> dict[str, Any]:
    """An idempotent producer: acks from every in-sync replica, retries that neither duplicate
    nor reorder within a partition."""
    return settings.client_config(
        **{
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": settings.compression,
            **overrides,
        }
    )


def cloudevent_headers(
    event_id: str, source: str, event_type: str, occur_time: datetime
) -> Headers:
    return [
        ("ce_specversion", CLOUDEVENTS_SPEC_VERSION.encode()),
        ("ce_id", event_id.encode()),
        ("ce_source", source.encode()),
        ("ce_type", event_type.encode()),
        ("ce_time", occur_time.astimezone(UTC).isoformat().replace("+00:00", "Z").encode()),
        ("content-type", CONTENT_TYPE.encode()),
    ]


def header_pairs(headers: MessageHeaders) -> Headers:
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def header(headers: MessageHeaders, name: str) -> str | None:
    """The last value of a header, decoded; None when absent or not UTF-8."""
    for key, value in reversed(header_pairs(headers)):
        if key == name and value is not None:
            if isinstance(value, str):
                return value
            try:
                return value.decode()
            except UnicodeDecodeError:
                return None
    return None


def headers_without(headers: MessageHeaders, prefix: str) -> Headers:
    return [(key, value) for key, value in header_pairs(headers) if not key.startswith(prefix)]


@dataclass(frozen=True)
class Position:
    topic: str
    partition: int
    offset: int


def position(message: Message) -> Position:
    """Where a consumed message is (always known for a message without error)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError("message has no position")
    return Position(topic, partition, offset)


def copy_and_wait(producer: Producer, message: Message, topic: str, headers: Headers) -> None:
    """Produces `message`'s key and value to `topic` and waits for the broker's acknowledgement;
    raises KafkaException if it does not come."""
    failures: list[KafkaError] = []
    producer.produce(
        topic,
        key=message.key(),
        value=message.value(),
        headers=headers,
        on_delivery=lambda error, _msg: failures.append(error) if error else None,
    )
    if producer.flush(30) or failures:
        raise KafkaException(failures[0] if failures else KafkaError(KafkaError._TIMED_OUT))


def ensure_topics(settings: KafkaSettings, timeout_seconds: float = 60.0) -> None:
    """Creates the project's topics if they do not exist (the broker never auto-creates them)."""
    admin = AdminClient(settings.client_config())
    # With three or more replicas, an acknowledged write survives the loss of one broker.
    min_insync = "2" if settings.replication_factor >= 3 else "1"
    wanted = [
        NewTopic(
            name,
            num_partitions=settings.topic_partitions,
            replication_factor=settings.replication_factor,
            config={"min.insync.replicas": min_insync},
        )
        for name in (settings.orders_topic, settings.users_topic, settings.orders_dlq_topic)
    ]
    deadline = time.monotonic() + timeout_seconds
    while True:
        pending = _create(admin, wanted)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not create topics {pending} on {settings.bootstrap_servers}")
        time.sleep(1)


def _create(admin: AdminClient, topics: Iterable[NewTopic]) -> list[str]:
    """Creates what it can; returns the names still to be created (the broker may be starting)."""
    pending = []
    for name, future in admin.create_topics(list(topics), request_timeout=10).items():
        try:
            future.result()
            log.info("topic created", extra={"fields": {"topic": name}})
        except KafkaException as error:
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                log.warning("topic not created yet: %s", error, extra={"fields": {"topic": name}})
                pending.append(name)
    return pending


def relay_transactional_id(settings: KafkaSettings, service_name: str) -> str:
    """The `transactional.id` shared by the outbox relays of a service: the one that leads fences
    the producers of earlier leaders (servicekit.outbox). Named after the topic the service
    writes, so deployments sharing a cluster (and test runs) never fence each other."""
    return f"{own_topic(settings, service_name)}.relay"


def own_topic(settings: KafkaSettings, service_name: str) -> str:
    """The topic a service publishes its events to."""
    topics = {"order_service": settings.orders_topic, "user_service": settings.users_topic}
    return topics[service_name]


@dataclass(frozen=True)
class Grant:
    """Operations a principal may perform on one topic, consumer group or transactional id."""

    principal: str  # the CN of its certificate
    resource: ResourceType
    name: str
    operations: tuple[AclOperation, ...]


_PRODUCE = (AclOperation.WRITE, AclOperation.DESCRIBE)
_CONSUME = (AclOperation.READ, AclOperation.DESCRIBE)


def access_grants(settings: KafkaSettings, processor_group: str) -> list[Grant]:
    """Who may do what on the broker: each service writes its own topic only, in transactions
    of its relays' id, and order_service reads its own (in no group); the processor reads the
    orders topic in its group and writes only the DLQ; the DLQ replay (its own principal) reads
    the DLQ and writes back to the orders topic. Everyone else is refused."""
    topic, group, transactional_id = (
        ResourceType.TOPIC,
        ResourceType.GROUP,
        ResourceType.TRANSACTIONAL_ID,
    )
    services = ("order_service", "user_service")
    return [
        *(Grant(name, topic, own_topic(settings, name), _PRODUCE) for name in services),
        *(
            Grant(name, transactional_id, relay_transactional_id(settings, name), _PRODUCE)
            for name in services
        ),
        # WatchOrder's feed reads every status change, in no group (order_service.watch).
        Grant("order_service", topic, settings.orders_topic, (AclOperation.READ,)),
        Grant("processor", topic, settings.orders_topic, _CONSUME),
        Grant("processor", group, processor_group, _CONSUME),
        Grant("processor", topic, settings.orders_dlq_topic, _PRODUCE),
        Grant("dlq_replay", topic, settings.orders_dlq_topic, _CONSUME),
        Grant("dlq_replay", group, f"{processor_group}-dlq-replay", _CONSUME),
        Grant("dlq_replay", topic, settings.orders_topic, _PRODUCE),
    ]


def _bindings(grants: Iterable[Grant]) -> list[AclBinding]:
    return [
        AclBinding(
            grant.resource,
            grant.name,
            ResourcePatternType.LITERAL,
            f"User:{grant.principal}",
            "*",
            operation,
            AclPermissionType.ALLOW,
        )
        for grant in grants
        for operation in grant.operations
    ]


def grant_access(settings: KafkaSettings, processor_group: str) -> None:
    """Creates the ACLs of access_grants (idempotent); needs a super user's certificate."""
    admin = AdminClient(settings.client_config())
    for future in admin.create_acls(
        _bindings(access_grants(settings, processor_group)), request_timeout=30
    ).values():
        future.result()


def revoke_access(settings: KafkaSettings, processor_group: str) -> None:
    """Deletes what grant_access created (for topics that are deleted with it)."""
    admin = AdminClient(settings.client_config())
    filters = [
        AclBindingFilter(
            b.restype,
            b.name,
            b.resource_pattern_type,
            b.principal,
            b.host,
            b.operation,
            b.permission_type,
        )
        for b in _bindings(access_grants(settings, processor_group))
    ]
    for future in admin.delete_acls(filters, request_timeout=30).values():
        future.result()
