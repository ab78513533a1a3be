"""Parsing of request fields shared by the services, and building of response fields."""

from __future__ import annotations

import unicodedata
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
# Joiners shape Indic and Persian script and emoji sequences; every other format character (bidi
# overrides and isolates, zero-width spaces, BOM, soft hyphen) only hides or reorders text.
_JOINERS = frozenset("\u200c\u200d")
# Control (C0, DEL, C1), format, surrogate and private-use characters.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co"})


def check_printable(value: str, field: str, allow_line_breaks: bool = False) -> str:
    """The value in NFC, or InvalidArgument if it holds a character that is not shown as itself:
    NUL (PostgreSQL cannot store it), other control characters, or format characters that
    reorder or hide text (U+202E and its kind) other than the joiners scripts need."""
    allowed = (_LINE_BREAKS_AND_TABS if allow_line_breaks else frozenset()) | _JOINERS
    for character in value:
        if unicodedata.category(character) in _HIDDEN_CATEGORIES and character not in allowed:
            raise InvalidArgument(
                field,
                f"must not contain control, format or private-use characters"
                f" (found U+{ord(character):04X})",
            )
    return unicodedata.normalize("NFC", value)


def to_timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)  # aware datetimes are converted to UTC
    return stamp
