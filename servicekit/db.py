"""The database engine, one session per RPC, and the declarative base every model shares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, MetaData, create_engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

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
    return create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=True,  # a restarted database must not surface as errors on stale connections
        connect_args={"connect_timeout": 3, "application_name": settings.service_name},
    )


SessionFactory = sessionmaker[Session]


def session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(engine, expire_on_commit=False)


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
