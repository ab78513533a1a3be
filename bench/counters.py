"""Exact counters of the work the pipeline did, read before and after a window: commits
(pg_stat_database), statements (pg_stat_statements), Kafka records (end offsets of a topic) and
RPCs (the services' JSON access logs)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import make_url

from servicekit.db import libpq_dsn
from servicekit.settings import KafkaSettings, with_password
from testsupport.processes import REPO

# Where chaos.stack.Stack has each part's stderr (its JSON log lines) written.
STACK_LOG_DIR = REPO / ".local" / "chaos"
# The relay's own table: statements writing nothing else are the relay's (asynchronous commits).
OUTBOX_TABLE = "outbox_events"
_WRITE_TARGET = re.compile(
    # Not `FOR [NO KEY] UPDATE` (a lock) nor `ON CONFLICT DO UPDATE` (part of an INSERT).
    r"\b(?:insert into|(?<!\bfor )(?<!\bkey )(?<!\bdo )update|delete from)"
    r"\s+(?:only\s+)?([\w.\"]+)",
    re.IGNORECASE,
)
_NOTIFY = re.compile(r"\bnotify\b|\bpg_notify\b", re.IGNORECASE)


def connect(database_url: str, dbname: str | None = None) -> psycopg2.extensions.connection:
    """An autocommit psycopg2 connection from a SQLAlchemy URL (to another database if given)."""
    url = make_url(with_password(database_url))
    if dbname:
        url = url.set(database=dbname)
    connection = psycopg2.connect(libpq_dsn(url.render_as_string(hide_password=False)))
    connection.autocommit = True
    return connection


def write_targets(query: str) -> set[str]:
    """The tables a statement inserts into, updates or deletes from."""
    flat = " ".join(query.split())
    return {match.group(1).strip('"').lower() for match in _WRITE_TARGET.finditer(flat)}


def is_request_path_write(query: str, toplevel: bool) -> bool:
    """A statement of CreateOrder or of the status callback: top level, writing a table besides
    the outbox. In autocommit each is one commit that waits for its WAL flush."""
    return toplevel and bool(write_targets(query) - {OUTBOX_TABLE})


def mentions_notify(query: str) -> bool:
    return bool(_NOTIFY.search(query))


StatementKey = tuple[int, int, bool]  # userid, queryid, toplevel


@dataclass(frozen=True)
class StatementCalls:
    query: str
    toplevel: bool
    calls: int


class DatabaseCounters:
    """pg_stat_database and pg_stat_statements of one database, read from database `postgres`
    (where scripts/postgres.sh creates the extension: the bench drops its own schema)."""

    def __init__(self, database_url: str) -> None:
        self.database = make_url(database_url).database or ""
        self._connection = connect(database_url, dbname="postgres")
        self.statements_missing = self._why_no_statements()

    def _fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._connection.cursor() as cursor:
            cursor.execute(sql, params)
            rows: list[tuple[Any, ...]] = cursor.fetchall()
            return rows

    def _why_no_statements(self) -> str | None:
        """None when pg_stat_statements can be read, else why not (said in the results)."""
        try:
            self._fetch("SELECT 1 FROM pg_stat_statements LIMIT 1")
        except psycopg2.errors.UndefinedTable:
            return "no extension pg_stat_statements in database postgres (postgres.sh up makes it)"
        except psycopg2.errors.ObjectNotInPrerequisiteState:
            return (
                "PostgreSQL runs without shared_preload_libraries=pg_stat_statements"
                " (scripts/postgres.sh up restarts a server that it started)"
            )
        return None

    @property
    def tracks_nested_statements(self) -> bool:
        return bool(self._fetch("SHOW pg_stat_statements.track")[0][0] == "all")

    def commits_and_sessions(self) -> tuple[int, int]:
        """Transactions committed in the database, and connections opened to it (each of which
        commits once too, at its start)."""
        rows = self._fetch(
            "SELECT xact_commit, sessions FROM pg_stat_database WHERE datname = %s",
            (self.database,),
        )
        return int(rows[0][0]), int(rows[0][1])

    def statements(self) -> dict[StatementKey, StatementCalls]:
        rows = self._fetch(
            "SELECT userid::bigint, queryid, toplevel, query, calls FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)",
            (self.database,),
        )
        return {(u, q, top): StatementCalls(text, top, calls) for u, q, top, text, calls in rows}

    def backends_elsewhere(self) -> set[int]:
        """Server processes connected to another database (other work sharing the server)."""
        rows = self._fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname IS NOT NULL AND datname <> %s",
            (self.database,),
        )
        return {int(pid) for (pid,) in rows}

    def close(self) -> None:
        self._connection.close()


def statement_calls_between(
    before: dict[StatementKey, StatementCalls], after: dict[StatementKey, StatementCalls]
) -> list[StatementCalls]:
    """Calls made in between, per statement (evicted entries count from zero)."""
    made = []
    for key, now in after.items():
        calls = now.calls - (before[key].calls if key in before else 0)
        if calls > 0:
            made.append(StatementCalls(now.query, now.toplevel, calls))
    return made


class TopicOffsets:
    """The sum of a topic's end offsets: records written to it so far (a transaction's commit
    marker is one per partition it wrote)."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._topic = topic
        self._consumer = Consumer(kafka.client_config(**{"group.id": "bench-offsets"}))

    def records(self) -> int:
        partitions = self._consumer.list_topics(self._topic, timeout=10).topics[self._topic]
        return sum(
            self._consumer.get_watermark_offsets(TopicPartition(self._topic, p), timeout=10)[1]
            for p in partitions.partitions
        )

    def close(self) -> None:
        self._consumer.close()


class AccessLog:
    """RPCs a service answered, counted by method from its JSON log lines (`"message": "rpc"`)
    written since the last read."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = path.stat().st_size if path.exists() else 0

    def calls_since_last_read(self) -> Counter[str]:
        calls: Counter[str] = Counter()
        if not self._path.exists():
            return calls
        with self._path.open("rb") as log:
            log.seek(self._offset)
            for raw in log:
                if not raw.endswith(b"\n"):
                    break  # a line still being written: read it next time
                self._offset += len(raw)
                calls.update(_rpc_method(raw))
        return calls


def _rpc_method(raw: bytes) -> list[str]:
    try:
        line = json.loads(raw)
    except ValueError:
        return []
    if not isinstance(line, dict) or line.get("message") != "rpc":
        return []
    return [str(line.get("method", "?"))]
