"""The database engine and its pool, and the declarative base every model shares."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase

from servicekit.call_scope import abandoned_connections
from servicekit.settings import ServiceSettings


class Base(DeclarativeBase):
    """Metadata of every table; Alembic migrations are checked against it."""

    # Predictable constraint names: the services map violations to statuses by these names.
    metadata = MetaData(
        naming_convention={
            "pk": "%(table_name)s_pkey",
            "uq": "%(table_name)s_%(column_0_name)s_key",
            "fk": "%(table_name)s_%(column_0_name)s_fkey",
            "ck": "%(table_name)s_%(constraint_name)s_check",
            "ix": "%(table_name)s_%(column_0_N_name)s_idx",
        }
    )


def create_db_engine(settings: ServiceSettings) -> Engine:
    timeout_ms = int(settings.db_statement_timeout_seconds * 1000)
    engine = create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=4,  # overflow connections are closed at check-in: bursts only
        connect_args={
            "connect_timeout": 3,
            "application_name": settings.service_name,
            # No statement runs unbounded, even for a call without a deadline.
            "options": f"-c statement_timeout={timeout_ms}",
        },
    )
    event.listen(engine, "checkin", _note_idle_since)
    event.listen(engine, "checkout", _check_before_reuse)
    return engine


# A connection idle for longer than this is pinged before reuse, so that a restarted database
# does not surface as errors on stale connections. Busy connections skip the round trip: if the
# database goes away under load, each stale one fails one statement (UNAVAILABLE, which callers
# retry) and is replaced (servicekit.sql).
PING_AFTER_IDLE_SECONDS = 1.0


def _note_idle_since(_dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _check_before_reuse(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Raising DisconnectionError makes the pool replace the connection and try again."""
    if dbapi_connection in abandoned_connections:
        abandoned_connections.discard(dbapi_connection)
        raise DisconnectionError("its statement was cancelled with its call")
    idle_since = record.info.get("idle_since")
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        if not dbapi_connection.autocommit:
            dbapi_connection.rollback()
    except Exception as error:
        raise DisconnectionError(f"stale connection: {error}") from error


def violated_constraint(error: Exception) -> str | None:
    """The name of the constraint PostgreSQL reported, e.g. `users_email_key` (from a psycopg2
    error, or one SQLAlchemy wraps)."""
    diag = getattr(getattr(error, "orig", error), "diag", None)
    return getattr(diag, "constraint_name", None)


def libpq_dsn(database_url: str) -> str:
    """The SQLAlchemy URL as a libpq connection URI for a plain psycopg2 connection, with every
    option of its query string (sslmode, sslrootcert, target_session_attrs, …) kept."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
