"""SQL on the request path: statements run on pooled psycopg2 connections, without the ORM.

Measured (`python -m bench.data_access`, bench/RESULTS.md): a primary-key read costs about four
times the client CPU through an ORM Session, and twice through SQLAlchemy Core, what it costs on a
pooled psycopg2 cursor. A service is bound by one core (the GIL), so that difference was most of
an RPC's cost. The models in servicekit.models stay the schema (Alembic, tests); handlers write
their few statements in SQL.

Every statement runs in autocommit: one round trip, atomic on its own. Changes that belong together
are one statement (`WITH … INSERT …`), so no transaction is held open across round trips.

Connections come from the engine's pool (which pings idle ones and replaces those whose statement
was cancelled) and belong to the current call while in use (servicekit.call_scope), so a call
that ends early has its statement cancelled.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import psycopg2
import psycopg2.extensions
from sqlalchemy import Engine

from servicekit.call_scope import CallScope

Params = Mapping[str, object]
Row = tuple[Any, ...]


class Database:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def fetch_one(self, sql: str, params: Params) -> Row | None:
        """The first row the statement returns, or None."""
        with self._connection() as connection, connection.cursor() as cursor:
            cursor.execute(sql, params)
            row: Row | None = cursor.fetchone()
            return row

    def fetch_all(self, sql: str, params: Params) -> list[Row]:
        with self._connection() as connection, connection.cursor() as cursor:
            cursor.execute(sql, params)
            rows: list[Row] = cursor.fetchall()
            return rows

    @contextmanager
    def _connection(self) -> Iterator[psycopg2.extensions.connection]:
        scope = CallScope.current()
        if scope is not None:
            scope.check_deadline()
        pooled = self._engine.raw_connection()
        connection: psycopg2.extensions.connection = pooled.driver_connection
        in_call = scope.using(connection) if scope is not None else nullcontext()
        try:
            connection.autocommit = True
            with in_call:
                yield connection
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as error:
            if connection.closed:
                pooled.invalidate(error)  # the pool opens a new one for the next call
            raise
        finally:
            pooled.close()
