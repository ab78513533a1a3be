"""`python -m processor.dlq_replay`: republish dead-lettered messages to the topic they came from.

Reads the DLQ from where the last replay stopped (consumer group `<PROCESSOR_GROUP_ID>-dlq-replay`)
up to its current end, republishes each message with its original key, value and headers, and
commits a DLQ offset only after the broker acknowledged the republished copy. Run it once the
cause (a bug, a missing order, an outage) is fixed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from processor.consumer import DLQ_HEADER_PREFIX, consumer_config
from processor.settings import ProcessorSettings
from servicekit.jsonlog import configure_logging
from servicekit.kafka import copy_and_wait, header, headers_without, position, producer_config
from servicekit.settings import SettingsError

log = logging.getLogger("processor.dlq_replay")


def replay(settings: ProcessorSettings, limit: int, idle_seconds: float = 10.0) -> int:
    """Republishes up to `limit` DLQ messages, up to the DLQ's end as it was at the start (what
    is dead-lettered again meanwhile waits for the next replay); returns how many."""
    dlq = settings.kafka.orders_dlq_topic
    consumer = Consumer(
        consumer_config(
            settings.kafka, f"{settings.group_id}-dlq-replay", **{"enable.auto.commit": False}
        )
    )
    producer = Producer(producer_config(settings.kafka, f"{settings.group_id}-dlq-replay"))
    replayed = 0
    try:
        ends = _assign_up_to_current_end(consumer, dlq)
        last_message = time.monotonic()
        while ends and replayed < limit and time.monotonic() - last_message < idle_seconds:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                raise KafkaException(message.error())
            last_message = time.monotonic()
            where = position(message)
            partition, offset = where.partition, where.offset
            if offset >= ends.get(partition, -1):
                ends.pop(partition, None)  # arrived after the start: left for the next replay
                continue
            _republish(producer, message, settings.kafka.orders_topic)
            consumer.commit(message=message, asynchronous=False)
            replayed += 1
            if offset + 1 >= ends[partition]:
                del ends[partition]
    finally:
        producer.flush(10)
        consumer.close()
    return replayed


def _assign_up_to_current_end(consumer: Consumer, topic: str) -> dict[int, int]:
    """Assigns each partition from the group's committed offset; returns partition -> end offset
    for the partitions that have something to replay."""
    partitions = [
        TopicPartition(topic, p)
        for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions
    ]
    ends: dict[int, int] = {}
    assignment = []
    for committed in consumer.committed(partitions, timeout=10):
        low, high = consumer.get_watermark_offsets(committed, timeout=10)
        start = committed.offset if committed.offset >= 0 else low
        start = max(start, low)
        if start < high:
            ends[committed.partition] = high
            assignment.append(TopicPartition(topic, committed.partition, start))
    consumer.assign(assignment)
    return ends


def _republish(producer: Producer, message: Message, default_topic: str) -> None:
    topic = header(message.headers(), "dlq_original_topic") or default_topic
    headers = headers_without(message.headers(), DLQ_HEADER_PREFIX)
    copy_and_wait(producer, message, topic, headers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--limit", type=int, default=10_000, help="replay at most this many")
    args = parser.parse_args()
    try:
        settings = ProcessorSettings.from_env(identity="dlq_replay")
    except SettingsError as error:
        sys.exit(f"configuration error: {error}")
    configure_logging("dlq-replay", settings.log_level)
    count = replay(settings, args.limit)
    log.info("replayed", extra={"fields": {"count": count, "dlq": settings.kafka.orders_dlq_topic}})
    print(f"replayed {count} message(s) from {settings.kafka.orders_dlq_topic}")


if __name__ == "__main__":
    main()
