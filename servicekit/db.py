"""The database engine, one session per RPC, and the declarative base every model shares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, create_engine, event, text
from sqlalchemy.exc import DisconnectionError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Session, SessionTransaction, sessionmaker

from servicekit.call_scope import CallScope, abandoned_connections
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
        max_overflow=settings.db_pool_size,
        pool_pre_ping=True,  # a restarted database must not surface as errors on stale connections
        connect_args={
            "connect_timeout": 3,
            "application_name": settings.service_name,
            # No statement runs unbounded, even for a call without a deadline.
            "options": f"-c statement_timeout={timeout_ms}",
        },
    )
    event.listen(engine, "checkout", _refuse_abandoned)
    return engine


def _refuse_abandoned(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    if dbapi_connection in abandoned_connections:
        abandoned_connections.discard(dbapi_connection)
        raise DisconnectionError("its statement was cancelled with its call")  # pool replaces it


SessionFactory = sessionmaker[Session]


def session_factory(engine: Engine, statement_timeout_seconds: float) -> SessionFactory:
    """Sessions whose transactions belong to the current RPC, if there is one (see call_scope)."""
    factory = sessionmaker(engine, expire_on_commit=False)
    default_timeout_ms = int(statement_timeout_seconds * 1000)

    def bind_to_call(session: Session, _transaction: Any, connection: Connection) -> None:
        scope = CallScope.current()
        if scope is None:
            return
        remaining_ms = scope.remaining_ms()
        if remaining_ms is not None and remaining_ms < default_timeout_ms:
            connection.exec_driver_sql(f"SET LOCAL statement_timeout = {remaining_ms}")
        scope.attach(session, connection.connection.dbapi_connection)

    event.listen(factory, "after_begin", bind_to_call)
    event.listen(factory, "after_transaction_end", _unbind_from_call)
    return factory


def _unbind_from_call(session: Session, transaction: SessionTransaction) -> None:
    scope = CallScope.current()
    if scope is not None and transaction.parent is None:
        scope.detach(session)


@contextmanager
def transaction(sessions: SessionFactory) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any exception."""
    with sessions() as session, session.begin():
        yield session


def database_answers(engine: Engine) -> bool:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def violated_constraint(error: IntegrityError) -> str | None:
    """The name of the constraint PostgreSQL reported, e.g. `users_email_key`."""
    diag = getattr(error.orig, "diag", None)
    return getattr(diag, "constraint_name", None)
