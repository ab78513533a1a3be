"""Alembic environment: migrates the database named by DATABASE_URL, as its owner role (password
from DATABASE_PASSWORD_FILE, or the local secrets `make certs` made)."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine

import dbschema.tables  # noqa: F401 (registers every table on Base.metadata)
from servicekit.db import Base
from servicekit.settings import DEFAULT_DATABASE_URL, with_password

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name)


def run_migrations() -> None:
    url = config.attributes.get("database_url") or os.environ.get(
        "DATABASE_URL", DEFAULT_DATABASE_URL
    )
    engine = create_engine(with_password(url))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
