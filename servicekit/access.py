"""Who may call what. Each service declares one table, method -> Rule; the RPC boundary
authenticates the caller (client certificate, bearer token) and applies the method's rule before
the handler runs. Rules that need the resource itself (whose order is this?) finish in the handler
through `check_owner`. A method without a rule is refused."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from servicekit.errors import PermissionDenied
from servicekit.tokens import Claims

ADMIN_SCOPE = "admin"
USER_SCOPE = "user"


@dataclass(frozen=True)
class Caller:
    """Who makes a call: the workload its certificate names and, when it sent one, what its
    verified bearer token says."""

    workload: str | None
    claims: Claims | None

    @property
    def is_admin(self) -> bool:
        return self.claims is not None and ADMIN_SCOPE in self.claims.scopes

    def acts_for(self, user_id: str) -> bool:
        """An admin acts for every user; a user token only for the user it names."""
        if self.is_admin:
            return True
        return (
            self.claims is not None
            and USER_SCOPE in self.claims.scopes
            and bool(user_id)
            and self.claims.subject.lower() == user_id.strip().lower()
        )


class Rule(Protocol):
    @property
    def needs_token(self) -> bool: ...

    def check(self, caller: Caller, request: Any) -> None:
        """Raises PermissionDenied when `caller` may not make this call."""


@dataclass(frozen=True)
class Workload:
    """Only the named workload's certificate (e.g. the processor's), token or not."""

    name: str
    needs_token = False

    def check(self, caller: Caller, request: Any) -> None:
        if caller.workload != self.name:
            raise PermissionDenied(
                f"only the {self.name} may call this method", reason="WORKLOAD_NOT_ALLOWED"
            )


@dataclass(frozen=True)
class Admin:
    """A token with the admin scope."""

    needs_token = True

    def check(self, caller: Caller, request: Any) -> None:
        if not caller.is_admin:
            raise PermissionDenied(
                "this method needs a token with the admin scope", reason="ADMIN_SCOPE_REQUIRED"
            )


@dataclass(frozen=True)
class ForUser:
    """An admin, or a user's token acting for the user the request's `field` names. Without
    that field (an unfiltered list), an admin only."""

    field: str
    needs_token = True

    def check(self, caller: Caller, request: Any) -> None:
        _require_user_or_admin(caller)
        user_id: str = getattr(request, self.field)
        if caller.acts_for(user_id):
            return
        if not user_id:
            raise PermissionDenied(
                f"without {self.field}, this method needs a token with the admin scope",
                reason="ADMIN_SCOPE_REQUIRED",
            )
        raise PermissionDenied(
            f"a user token acts only for its own user; {self.field} names another",
            reason="NOT_RESOURCE_OWNER",
        )


@dataclass(frozen=True)
class Owner:
    """An admin, or the user owning the resource; the handler checks ownership once it has read
    the resource (check_owner)."""

    needs_token = True

    def check(self, caller: Caller, request: Any) -> None:
        _require_user_or_admin(caller)


def _require_user_or_admin(caller: Caller) -> None:
    if not caller.is_admin and (caller.claims is None or USER_SCOPE not in caller.claims.scopes):
        raise PermissionDenied(
            f"this method needs a token with the {USER_SCOPE} or {ADMIN_SCOPE} scope",
            reason="SCOPE_REQUIRED",
        )


AccessTable = Mapping[str, Rule]  # method name (e.g. "GetOrder") -> who may call it

_current: ContextVar[Caller | None] = ContextVar("caller", default=None)


@contextmanager
def calling_as(caller: Caller) -> Iterator[None]:
    token = _current.set(caller)
    try:
        yield
    finally:
        _current.reset(token)


def check_owner(owner_user_id: str | None, what: str) -> None:
    """Lets the call go on if its caller acts for the owner of `what`. A resource that does not
    exist (owner None) is refused the same way to a non-admin, so that ids cannot be probed."""
    caller = _current.get()
    if caller is not None and (caller.is_admin or caller.acts_for(owner_user_id or "")):
        return
    raise PermissionDenied(
        f"{what} does not exist or belongs to another user", reason="NOT_RESOURCE_OWNER"
    )
