"""`python -m servicekit.topics`: create the topics named by the KAFKA_* settings (idempotent)."""

from __future__ import annotations

import logging
import os

from servicekit.jsonlog import configure_logging
from servicekit.kafka import ensure_topics
from servicekit.settings import KafkaSettings, parse_log_level

if __name__ == "__main__":
    configure_logging("topics", parse_log_level(os.environ))
    settings = KafkaSettings.from_env(os.environ)
    ensure_topics(settings)
    logging.getLogger("servicekit.topics").info(
        "topics ready",
        extra={
            "fields": {
                "topics": [settings.orders_topic, settings.users_topic, settings.orders_dlq_topic]
            }
        },
    )
