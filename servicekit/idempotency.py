"""AIP-155 request ids: a retried Create returns the first result and creates nothing new."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Uuid, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from servicekit.db import SessionFactory, transaction
from servicekit.errors import InvalidArgument


class RequestIdColumn:
    """Mixin for a table whose rows remember the request_id that created them (unique per table)."""

    __tablename__: str
    request_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, unique=True)


Record = TypeVar("Record", bound=RequestIdColumn)


def create_once(
    sessions: SessionFactory,
    record: Record,
    same_request: Callable[[Record], bool],
    in_same_transaction: Callable[[Session, Record], None] | None = None,
) -> Record:
    """Inserts `record`, or returns the row that an earlier request with its request_id created.

    Two retries racing each other are settled by the unique constraint on request_id: the loser
    gets the winner's row. A request_id reused for a request with other data is refused, since
    returning the first result would silently drop the second request.
    Other constraint violations propagate as IntegrityError for the caller to map.
    `in_same_transaction` runs after the insert (server defaults filled in) and commits with it:
    the place to stage the event that announces the new row.
    """
    request_id = record.request_id
    model = type(record)
    if request_id is not None and (earlier := _created_by(sessions, model, request_id)):
        return _replay(earlier, same_request)
    try:
        with transaction(sessions) as session:
            session.add(record)
            if in_same_transaction is not None:
                session.flush()
                in_same_transaction(session, record)
    except IntegrityError:
        # A concurrent retry committed first. Which unique index reports the clash (request_id,
        # or e.g. the email it also carries) depends on index order, so look for its row.
        if request_id is not None and (earlier := _created_by(sessions, model, request_id)):
            return _replay(earlier, same_request)
        raise
    return record


def _created_by(
    sessions: SessionFactory, model: type[Record], request_id: uuid.UUID
) -> Record | None:
    with sessions() as session:
        return session.scalars(select(model).where(model.request_id == request_id)).one_or_none()


def _replay(earlier: Record, same_request: Callable[[Record], bool]) -> Record:
    if not same_request(earlier):
        raise InvalidArgument(
            "request_id",
            "was already used for a request with different fields; send a new UUID",
            reason="REQUEST_ID_REUSED",
        )
    return earlier
