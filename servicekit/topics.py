"""`python -m servicekit.topics`: create the topics named by the KAFKA_* settings and the ACLs of
each principal on them (idempotent). Runs as the operator (`admin` identity, a Kafka super user)."""

from __future__ import annotations

import logging
import os

from servicekit.jsonlog import configure_logging
from servicekit.kafka import ensure_topics, grant_access
from servicekit.settings import KafkaSettings, TlsSettings, env_text, parse_log_level

if __name__ == "__main__":
    configure_logging("topics", parse_log_level(os.environ))
    settings = KafkaSettings.from_env(os.environ, TlsSettings.from_env(os.environ, "admin"))
    ensure_topics(settings)
    grant_access(settings, env_text(os.environ, "PROCESSOR_GROUP_ID", "order-processor"))
    logging.getLogger("servicekit.topics").info(
        "topics ready",
        extra={
            "fields": {
                "topics": [settings.orders_topic, settings.users_topic, settings.orders_dlq_topic]
            }
        },
    )
