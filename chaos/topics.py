"""Reading a topic from its beginning to its current end, for assertions on what was published."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from servicekit.kafka import Headers, header, header_pairs, position
from servicekit.settings import KafkaSettings


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers

    def header(self, name: str) -> str | None:
        return header(self.headers, name)


def read_topic(kafka: KafkaSettings, topic: str, timeout: float = 30.0) -> list[Record]:
    """As `kafka`'s identity (the operator's, which may read every topic)."""
    consumer = Consumer(
        kafka.client_config(
            **{
                "group.id": f"test-reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Record] = []
        at_end: set[int] = set()
        while len(at_end) < len(partitions):
            message = consumer.poll(timeout)
            if message is None:
                raise TimeoutError(f"{topic}: no message or end of partition in {timeout} s")
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                at_end.add(position(message).partition)
                continue
            where = position(message)
            records.append(
                Record(
                    where.partition,
                    where.offset,
                    message.key(),
                    message.value(),
                    header_pairs(message.headers()),
                )
            )
        return records
    finally:
        consumer.close()
