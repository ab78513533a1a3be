"""Ties the database work of an RPC to the RPC: statements are bounded by the call's remaining
deadline, and a call the client cancels (or abandons by disconnecting) has its running statement
cancelled, so the server stops working for nobody.

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

from servicekit.errors import DeadlineExceeded

_NO_DEADLINE_SECONDS = 365 * 24 * 3600.0
_current: ContextVar[CallScope | None] = ContextVar("current_call", default=None)


class CallScope:
    """One RPC's deadline, cancellation and the database connections it has in a transaction."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.cancelled = False
        self._running = True
        self._lock = threading.Lock()
        self._connections: dict[int, Any] = {}  # id(session) -> DBAPI connection in a transaction

    @staticmethod
    def current() -> CallScope | None:
        return _current.get()

    def remaining_ms(self) -> int | None:
        """Milliseconds left before the deadline, or None for a call without one (gRPC reports
        that as a time far in the future); raises DeadlineExceeded if none are left."""
        remaining = self.context.time_remaining()
        if remaining is None or remaining > _NO_DEADLINE_SECONDS:
            return None
        if remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed before its work was done")
        return max(1, int(remaining * 1000))

    def attach(self, session: object, dbapi_connection: Any) -> None:
        with self._lock:
            self._connections[id(session)] = dbapi_connection

    def detach(self, session: object) -> None:
        with self._lock:  # waits for a cancel in progress on this connection
            self._connections.pop(id(session), None)

    def _on_rpc_end(self) -> None:
        """gRPC calls this when the RPC ends; while the handler still runs, that is a cancel."""
        with self._lock:
            if not self._running:
                return
            self.cancelled = True
            for connection in self._connections.values():
                abandoned_connections.add(connection)
                connection.cancel()

    @contextmanager
    def entered(self) -> Iterator[CallScope]:
        """Around the handler: the database work inside belongs to this call."""
        token = _current.set(self)
        self.context.add_callback(self._on_rpc_end)
        try:
            yield self
        finally:
            with self._lock:
                self._running = False
            _current.reset(token)


# DBAPI connections whose statement was cancelled; the pool discards them at their next checkout.
abandoned_connections: set[Any] = set()
