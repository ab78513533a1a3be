"""AIP-158 pagination: page sizes, and opaque keyset page tokens tied to the request's filter.

Lists are ordered by (create_time, id), so a token naming the last row returned stays valid while
rows are inserted between pages: new rows sort after it or are skipped, never repeated.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from servicekit.errors import InvalidArgument
from servicekit.sql import Database

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_TOKEN_VERSION = 1
# Tokens carry the list's filter (a UUID at most) and a cursor: well under this.
MAX_PAGE_TOKEN_CHARS = 1024


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size", f"must not be negative, got {requested}")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


@dataclass(frozen=True)
class Cursor:
    """The position after the last row of a page."""

    create_time: datetime
    id: uuid.UUID


def encode_page_token(cursor: Cursor, list_filter: str) -> str:
    payload = {
        "v": _TOKEN_VERSION,
        "f": list_filter,
        "t": cursor.create_time.isoformat(),
        "i": str(cursor.id),
    }
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, list_filter: str) -> Cursor | None:
    """None for the first page; InvalidArgument for a malformed token or one of another filter."""
    if not token:
        return None
    invalid = InvalidArgument(
        "page_token", "is not a token returned by a previous call of this list"
    )
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise invalid  # a token of ours is a few hundred characters: nothing longer is parsed
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        if not isinstance(payload, dict) or payload.get("v") != _TOKEN_VERSION:
            raise invalid
        if payload.get("f") != list_filter:
            raise InvalidArgument(
                "page_token",
                "was issued for a different filter; repeat the original request's filter",
            )
        create_time = datetime.fromisoformat(payload["t"])
        if create_time.tzinfo is None:
            raise invalid
        return Cursor(create_time=create_time, id=uuid.UUID(payload["i"]))
    except InvalidArgument:
        raise
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise invalid from None


class Listed(Protocol):
    """A row of a list: lists are ordered by (create_time, id)."""

    @property
    def create_time(self) -> datetime: ...

    @property
    def id(self) -> uuid.UUID: ...


ListedRow = TypeVar("ListedRow", bound=Listed)


@dataclass(frozen=True)
class ListQuery(Generic[ListedRow]):
    """`SELECT <columns of row_type> FROM <table> WHERE <column> = <value> AND …`."""

    table: str
    row_type: Callable[..., ListedRow]
    columns: str
    equal_to: Mapping[str, object]


def fetch_page(
    database: Database,
    query: ListQuery[ListedRow],
    requested_page_size: int,
    page_token: str,
    list_filter: str,
) -> tuple[list[ListedRow], str]:
    """One page in (create_time, id) order, and the next page's token ("" at the end)."""
    size = page_size(requested_page_size)
    cursor = decode_page_token(page_token, list_filter)
    conditions = [f"{column} = %({column})s" for column in query.equal_to]
    params: dict[str, object] = {**query.equal_to, "limit": size + 1}
    if cursor is not None:
        conditions.append("(create_time, id) > (%(after_time)s, %(after_id)s::uuid)")
        params |= {"after_time": cursor.create_time, "after_id": cursor.id}
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    sql = (
        f"SELECT {query.columns} FROM {query.table}{where} ORDER BY create_time, id LIMIT %(limit)s"
    )
    rows = [query.row_type(*row) for row in database.fetch_all(sql, params)]
    if len(rows) <= size:
        return rows, ""
    last = rows[size - 1]
    next_cursor = Cursor(create_time=last.create_time, id=last.id)
    return rows[:size], encode_page_token(next_cursor, list_filter)
