"""Ties the database work of an RPC to the RPC: when the call ends before its handler does (its
deadline passed, or the client cancelled or disconnected), the RPC boundary is told at once (its
wait for the handler is cancelled) and cancels the statement the call is running, so the server
stops working for nobody. This costs no round trip while the call is alive (a `SET LOCAL
statement_timeout` per transaction did, and bounded only the statements, not the time between
them).

A connection whose statement was cancelled is never handed to another call: PostgreSQL acts on a
cancel request asynchronously, so it is discarded at its next checkout from the pool.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import grpc

from servicekit.errors import Cancelled, DeadlineExceeded

_current: ContextVar[CallScope | None] = ContextVar("current_call", default=None)


class CallScope:
    """One RPC's deadline, cancellation and the database connections it has in a transaction."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.cancelled = False
        self._running = True
        self._lock = threading.Lock()
        self._connections: set[Any] = set()  # the DBAPI connections in use
        self.log_fields: dict[str, object] = {}  # added to the call's access-log line

    @staticmethod
    def current() -> CallScope | None:
        return _current.get()

    def deadline_passed(self) -> bool:
        remaining = self.context.time_remaining()
        return remaining is not None and remaining <= 0

    def check_deadline(self) -> None:
        """Before starting database work: none is started for a call already out of time."""
        if self.deadline_passed():
            raise DeadlineExceeded("the call's deadline passed before its work was done")

    @contextmanager
    def using(self, dbapi_connection: Any) -> Iterator[None]:
        """While inside, an end of the call cancels the statement running on the connection; a
        call that has already ended starts no statement."""
        with self._lock:
            if self.cancelled:
                raise Cancelled("the call ended before this statement")
            self._connections.add(dbapi_connection)
        try:
            yield
        finally:
            with self._lock:  # waits for a cancel in progress on this connection
                self._connections.discard(dbapi_connection)

    def end_early(self) -> None:
        """The call ended (cancelled, or out of time) while its handler may still run: cancels
        the statements it is running."""
        with self._lock:
            if not self._running:
                return
            self.cancelled = True
            for connection in self._connections:
                abandoned_connections.add(connection)
                connection.cancel()

    @contextmanager
    def entered(self) -> Iterator[CallScope]:
        """Around the handler: the database work inside belongs to this call."""
        token = _current.set(self)
        try:
            yield self
        finally:
            with self._lock:
                self._running = False
            _current.reset(token)


def annotate_log(**fields: object) -> None:
    """Adds fields (ids, outcomes) to the current call's one access-log line."""
    scope = _current.get()
    if scope is not None:
        scope.log_fields.update(fields)


# DBAPI connections whose statement was cancelled; the pool discards them at their next checkout.
abandoned_connections: set[Any] = set()
