"""Parsing of request fields shared by the services, and building of response fields."""

from __future__ import annotations

import uuid
from datetime import datetime

from google.protobuf import timestamp_pb2

from servicekit.errors import InvalidArgument


def parse_id(value: str, field: str = "id") -> uuid.UUID:
    if not value:
        raise InvalidArgument(field, "is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(field, f"must be a UUID, got {value[:64]!r}") from None


def parse_request_id(value: str) -> uuid.UUID | None:
    """AIP-155: optional, and a UUID when given."""
    return parse_id(value, "request_id") if value else None


def to_timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)  # aware datetimes are converted to UTC
    return stamp
