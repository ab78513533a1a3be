"""Applying the Alembic migrations from code (tests and the fault suite use it)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from servicekit.settings import with_password

_ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def migrate(database_url: str) -> None:
    config = Config(str(_ALEMBIC_INI))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")


def recreate_disposable_database(database_url: str) -> None:
    """Drops every table of a test or fault-suite database and migrates it from scratch.
    Never point this at a database whose data matters."""
    engine = create_engine(with_password(database_url))
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    migrate(database_url)
