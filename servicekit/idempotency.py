"""AIP-155 request ids: a retried Create returns the first result and creates nothing new."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Generic, Protocol, TypeVar

from psycopg2 import IntegrityError
from sqlalchemy import Uuid
from sqlalchemy.orm import Mapped, mapped_column

from servicekit.errors import InvalidArgument
from servicekit.outbox import StagedEvent, stage_events_if_any, staged_params, wake_up
from servicekit.sql import Database, Statement


class RequestIdColumn:
    """Mixin for a table whose rows remember the request_id that created them (unique per table)."""

    __tablename__: str
    request_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, unique=True)


class TableRow(Protocol):
    """A row as a NamedTuple whose fields are the table's column names."""

    @property
    def _fields(self) -> tuple[str, ...]: ...

    def _asdict(self) -> dict[str, Any]: ...


Created = TypeVar("Created", bound=TableRow)


@dataclass(frozen=True)
class Creation(Generic[Created]):
    """One row to create idempotently, and the event that announces it."""

    table: str
    new_row: Created
    request_id: uuid.UUID | None
    event: StagedEvent
    same_request: Callable[[Created], bool]


@cache
def insert_once(table: str, columns: tuple[str, ...]) -> Statement:
    """One statement: the row, unless its request_id was used already, and then its event.
    Returns a row iff it inserted."""
    values = ", ".join(f"%({column})s" for column in columns)
    return Statement(
        f"WITH new_row AS (INSERT INTO {table} ({', '.join(columns)}, request_id)"
        f" VALUES ({values}, %(request_id)s::uuid) ON CONFLICT (request_id) DO NOTHING"
        f" RETURNING id) {stage_events_if_any('new_row')}"
    )


@cache
def _find(table: str, columns: tuple[str, ...]) -> Statement:
    return Statement(
        f"SELECT {', '.join(columns)} FROM {table} WHERE request_id = %(request_id)s::uuid"
    )


def create_once(database: Database, creation: Creation[Created]) -> Created:
    """Inserts the new row, or returns the row that an earlier request with its request_id created.

    A first request costs one statement. Two retries racing each other are settled by the unique
    constraint on request_id: the loser gets the winner's row. A request_id reused for a request
    with other data is refused, since returning the first result would silently drop the second
    request. Other constraint violations propagate as IntegrityError for the caller to map.
    """
    row = creation.new_row
    params = {
        **row._asdict(),
        "request_id": creation.request_id,
        **staged_params([creation.event]),
    }
    try:
        if database.fetch_one(insert_once(creation.table, row._fields), params) is not None:
            wake_up.events_staged()
            return row
    except IntegrityError:
        # A concurrent retry committed first, and which unique index reports the clash
        # (request_id, or e.g. the email it also carries) depends on index order.
        if (earlier := _created_by(database, creation)) is not None:
            return earlier
        raise
    earlier = _created_by(database, creation)
    if earlier is None:  # only a request_id conflict makes the insert return nothing
        raise RuntimeError("the insert returned nothing and no row has its request_id")
    return earlier


def _created_by(database: Database, creation: Creation[Created]) -> Created | None:
    if creation.request_id is None:
        return None
    statement = _find(creation.table, creation.new_row._fields)
    found = database.fetch_one(statement, {"request_id": creation.request_id})
    if found is None:
        return None
    earlier = type(creation.new_row)(*found)
    if not creation.same_request(earlier):
        raise InvalidArgument(
            "request_id",
            "was already used for a request with different fields; send a new UUID",
            reason="REQUEST_ID_REUSED",
        )
    return earlier
