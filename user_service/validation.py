"""Rules for user fields: what CreateUser accepts and how it normalises it."""

from __future__ import annotations

import re

from servicekit.errors import InvalidArgument
from servicekit.fields import check_printable

MAX_EMAIL_LENGTH = 254
MAX_LOCAL_PART_LENGTH = 64
MAX_NAME_LENGTH = 200

# Deliberately plain: one @, no spaces or control characters, a dotted domain of DNS labels.
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}")


def normalise_email(raw: str) -> str:
    """Trimmed, with the domain lower-cased (the local part is case-sensitive by RFC 5321)."""
    email = raw.strip()
    if not email:
        raise InvalidArgument("email", "is required")
    if len(email) > MAX_EMAIL_LENGTH:
        raise InvalidArgument("email", f"must be at most {MAX_EMAIL_LENGTH} characters")
    local, at, domain = email.rpartition("@")
    if (
        not at
        or len(local) > MAX_LOCAL_PART_LENGTH
        or not _LOCAL_PART.fullmatch(local)
        or local.startswith(".")
        or local.endswith(".")
        or ".." in local
        or not _DOMAIN.fullmatch(domain)
    ):
        raise InvalidArgument("email", "must be an address like name@example.com")
    return f"{local}@{domain.lower()}"


def normalise_name(raw: str) -> str:
    name = raw.strip()
    if not name:
        raise InvalidArgument("name", "is required")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument("name", f"must be at most {MAX_NAME_LENGTH} characters")
    return check_printable(name, "name")
