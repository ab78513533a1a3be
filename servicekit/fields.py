"""Parsing of request fields shared by the services, and building of response fields."""

from __future__ import annotations

import uuid
from datetime import datetime

from google.protobuf import timestamp_pb2

from servicekit.errors import InvalidArgument, excerpt


def parse_id(value: str, field: str = "id") -> uuid.UUID:
    if not value:
        raise InvalidArgument(field, "is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(field, f"must be a UUID, got {excerpt(value)}") from None


def parse_request_id(value: str) -> uuid.UUID | None:
    """AIP-155: optional, and a UUID when given."""
    return parse_id(value, "request_id") if value else None


_LINE_BREAKS_AND_TABS = frozenset("\t\n\r")


def check_printable(value: str, field: str, allow_line_breaks: bool = False) -> str:
    """Rejects NUL (PostgreSQL cannot store it in text) and other control characters."""
    allowed = _LINE_BREAKS_AND_TABS if allow_line_breaks else frozenset()
    if any((ord(c) < 32 or ord(c) == 127) and c not in allowed for c in value):
        raise InvalidArgument(field, "must not contain NUL or other control characters")
    return value


def to_timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)  # aware datetimes are converted to UTC
    return stamp
