"""AIP-155 request ids: a retried Create returns the first result and creates nothing new."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from psycopg2 import IntegrityError
from sqlalchemy import Uuid
from sqlalchemy.orm import Mapped, mapped_column

from servicekit.errors import InvalidArgument
from servicekit.sql import Database


class RequestIdColumn:
    """Mixin for a table whose rows remember the request_id that created them (unique per table)."""

    __tablename__: str
    request_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, unique=True)


Created = TypeVar("Created")


@dataclass(frozen=True)
class Creation(Generic[Created]):
    """How to create one row idempotently.

    `insert_sql` inserts with `ON CONFLICT (request_id) DO NOTHING` and returns a row iff it
    inserted; `find_sql` selects the row of `%(request_id)s` as `row_type`'s fields."""

    new_row: Created
    insert_sql: str
    params: Mapping[str, object]
    request_id: uuid.UUID | None
    find_sql: str
    row_type: Callable[..., Created]
    same_request: Callable[[Created], bool]


def create_once(database: Database, creation: Creation[Created]) -> Created:
    """Inserts the new row, or returns the row that an earlier request with its request_id created.

    A first request costs one statement. Two retries racing each other are settled by the unique
    constraint on request_id: the loser gets the winner's row. A request_id reused for a request
    with other data is refused, since returning the first result would silently drop the second
    request. Other constraint violations propagate as IntegrityError for the caller to map.
    """
    try:
        if database.fetch_one(creation.insert_sql, creation.params) is not None:
            return creation.new_row
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
    row = database.fetch_one(creation.find_sql, {"request_id": creation.request_id})
    if row is None:
        return None
    earlier = creation.row_type(*row)
    if not creation.same_request(earlier):
        raise InvalidArgument(
            "request_id",
            "was already used for a request with different fields; send a new UUID",
            reason="REQUEST_ID_REUSED",
        )
    return earlier
