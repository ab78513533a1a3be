"""Credentials for the project's own tools (tests, bench, fault suite): the certificates `make
certs` made and tokens signed with its key, held as a real caller would hold them."""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import grpc
from sqlalchemy import make_url

from servicekit.settings import AuthSettings, TlsSettings, with_password
from servicekit.tls import open_channel
from servicekit.tokens import issue_token

CERTS_DIR = Path(
    os.environ.get("CERTS_DIR") or Path(__file__).resolve().parent.parent / ".local/certs"
)
CERTS_ENV = {"CERTS_DIR": str(CERTS_DIR)}
AUTH = AuthSettings.from_env(CERTS_ENV)
ADMIN_SUBJECT = "test-admin"


DATABASE_ROLES = ("user_service", "order_service")  # the services' own roles (migration 0004)


def role_url(database_url: str, role: str) -> str:
    """The same database, logged into as `role`; the password is looked up by who connects."""
    return make_url(database_url).set(username=role, password=None).render_as_string()


def as_role(database_url: str, role: str) -> str:
    """The same database as `role`, with its password (from the local secrets)."""
    return with_password(role_url(database_url, role))


def tls_of(identity: str) -> TlsSettings:
    """The TLS settings of a process holding `identity`'s certificate."""
    return TlsSettings.from_env(CERTS_ENV, identity)


def token(
    subject: str = ADMIN_SUBJECT,
    scopes: Iterable[str] = ("admin",),
    ttl: timedelta = timedelta(hours=1),
) -> str:
    private_key = (CERTS_DIR / "token-signing.key").read_bytes()
    return issue_token(private_key, AUTH, subject, list(scopes), ttl)


def channel(address: str, identity: str = "client", bearer: str | None = None) -> grpc.Channel:
    """A channel presenting `identity`'s certificate and, on every call, `bearer`."""
    return open_channel(address, tls_of(identity), bearer)


def admin_channel(address: str) -> grpc.Channel:
    return channel(address, bearer=token())


def user_channel(address: str, user_id: str) -> grpc.Channel:
    """As the user `user_id`, through a user-scoped token naming it."""
    return channel(address, bearer=token(user_id, ["user"]))
