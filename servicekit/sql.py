"""SQL on the request path: statements run on pooled psycopg2 connections, without the ORM.

Measured (`python -m bench.data_access`, bench/RESULTS.md): a primary-key read costs about four
times the client CPU through an ORM Session, and twice through SQLAlchemy Core, what it costs on a
pooled psycopg2 cursor. A service is bound by one core (the GIL), so that difference was most of
an RPC's cost. The models in dbschema.tables stay the schema (Alembic, tests); handlers write
their few statements in SQL.

Every statement runs in autocommit: one round trip, atomic on its own. Changes that belong together
are one statement (`WITH … INSERT …`), so no transaction is held open across round trips.

The statements a service runs on every call are `Statement`s: prepared once per connection
(psycopg2 has no server-side prepare of its own, so `PREPARE`/`EXECUTE` in SQL), which spares
PostgreSQL parsing and planning them on each call.

Connections come from the engine's pool (which pings idle ones and replaces those whose statement
was cancelled) and belong to the current call while in use (servicekit.call_scope), so a call
that ends early has its statement cancelled.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2.extensions import cursor as Cursor
from sqlalchemy import Engine

from servicekit.call_scope import CallScope
from servicekit.tracing import database_statement

Params = Mapping[str, object]
Row = tuple[Any, ...]

_NAMED_PARAMETER = re.compile(r"%\((\w+)\)s")


@dataclass(frozen=True)
class Statement:
    """A statement with `%(name)s` parameters, run as a prepared statement.

    Parameters whose type PostgreSQL cannot infer from where they stand (a SELECT list, an array
    for `unnest`) need a cast in the SQL, e.g. `%(payload)s::bytea`.
    """

    sql: str
    name: str = field(init=False)
    parameters: tuple[str, ...] = field(init=False)
    prepare_sql: str = field(init=False)
    execute_sql: str = field(init=False)

    def __post_init__(self) -> None:
        order: dict[str, int] = {}

        def positional(match: re.Match[str]) -> str:
            return f"${order.setdefault(match.group(1), len(order) + 1)}"

        body = _NAMED_PARAMETER.sub(positional, self.sql)
        name = "s_" + hashlib.sha1(self.sql.encode()).hexdigest()[:16]
        arguments = ", ".join(["%s"] * len(order))
        set_field = object.__setattr__  # frozen: fields derived once, here
        set_field(self, "name", name)
        set_field(self, "parameters", tuple(order))
        set_field(self, "prepare_sql", f"PREPARE {name} AS {body}")
        set_field(
            self, "execute_sql", f"EXECUTE {name} ({arguments})" if order else f"EXECUTE {name}"
        )

    def run(self, cursor: Cursor, params: Params, prepared: set[str]) -> None:
        """Executes on `cursor`, preparing first if the connection (whose prepared names are in
        `prepared`) has not seen this statement yet."""
        if self.name not in prepared:
            cursor.execute(self.prepare_sql)
            prepared.add(self.name)
        cursor.execute(self.execute_sql, [params[name] for name in self.parameters])


class Database:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def fetch_one(self, sql: str | Statement, params: Params) -> Row | None:
        """The first row the statement returns, or None."""
        with self._cursor(sql, params) as cursor:
            row: Row | None = cursor.fetchone()
            return row

    def fetch_all(self, sql: str | Statement, params: Params) -> list[Row]:
        with self._cursor(sql, params) as cursor:
            rows: list[Row] = cursor.fetchall()
            return rows

    @contextmanager
    def _cursor(self, sql: str | Statement, params: Params) -> Iterator[Cursor]:
        text = sql.sql if isinstance(sql, Statement) else sql
        with (
            database_statement(text),
            self._connection() as (connection, prepared),
            connection.cursor() as cursor,
        ):
            if isinstance(sql, Statement):
                sql.run(cursor, params, prepared)
            else:
                cursor.execute(sql, params)
            yield cursor

    @contextmanager
    def _connection(self) -> Iterator[tuple[psycopg2.extensions.connection, set[str]]]:
        scope = CallScope.current()
        if scope is not None:
            scope.check_deadline()
        pooled = self._engine.raw_connection()
        connection: psycopg2.extensions.connection = pooled.driver_connection
        # The pool clears `info` when it replaces the connection: prepared names go with it.
        prepared: set[str] = pooled.info.setdefault("prepared_statements", set())
        in_call = scope.using(connection) if scope is not None else nullcontext()
        try:
            connection.autocommit = True
            with in_call:
                yield connection, prepared
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as error:
            if connection.closed:
                pooled.invalidate(error)  # the pool opens a new one for the next call
            raise
        finally:
            pooled.close()
