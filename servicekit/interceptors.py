"""The one place where callers are authenticated and authorized, where RPC outcomes are decided
for logging, and where errors become statuses."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, cast

import grpc
import psycopg2
from opentelemetry.trace import Span
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from servicekit.access import AccessTable, Caller, Rule, calling_as
from servicekit.call_scope import CallScope
from servicekit.errors import (
    Cancelled,
    DeadlineExceeded,
    PermissionDenied,
    ServiceError,
    Unavailable,
    excerpt,
)
from servicekit.metrics import RPC_SECONDS, RPCS
from servicekit.tls import peer_workload
from servicekit.tokens import TokenVerifier
from servicekit.tracing import rpc_ended, served_rpc

log = logging.getLogger("servicekit.rpc")

# Request fields worth a place in the access log: ids only, never personal data.
_LOGGED_ID_FIELDS = ("id", "user_id", "request_id")
# A UUID has 36 characters; whatever a client sends instead is logged as an excerpt, so that a
# log line stays short whatever the input.
_LOGGED_ID_CHARS = 40

QUERY_CANCELED = "57014"  # PostgreSQL: statement_timeout, or a cancel request
# The database is down, restarting or out of connections (or a statement was cancelled): the
# errors of psycopg2 and those SQLAlchemy's pool wraps.
_DATABASE_UNREACHABLE = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    OperationalError,
    InterfaceError,
    PoolTimeoutError,
)


class RpcBoundary(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Around each RPC of the service: authenticates the caller and applies the method's access
    rule, maps domain errors to gRPC statuses, writes one JSON access-log line, and makes the
    call's server span (continuing the caller's trace).

    Unary handlers stay synchronous and run on `workers` once the request has arrived; the event
    loop only waits for them, so it notices at once when a call ends early (deadline, cancel)
    and has the call's database work cancelled. Server-streaming handlers are async generators
    on the event loop (an open stream holds no worker); they hand blocking work to the workers
    themselves."""

    def __init__(
        self,
        service_full_name: str,
        access: AccessTable,
        tokens: TokenVerifier,
        workers: futures.Executor,
    ) -> None:
        self._prefix = f"/{service_full_name}/"
        self._access = access
        self._tokens = tokens
        self._workers = workers
        # The wrapped handler of each method, made at its first call, not at every call.
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        if (wrapped := self._wrapped.get(method)) is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler  # health and reflection: open to every certificate, none of ours
        if handler.unary_unary is not None:
            self._wrapped[method] = self._wrap(method, handler.unary_unary, handler)
        elif handler.unary_stream is not None:
            # Ours are async generators (see the class's docstring).
            streaming = cast(Callable[[Any, Any], AsyncIterator[Any]], handler.unary_stream)
            self._wrapped[method] = self._wrap_stream(method, streaming, handler)
        else:
            # None of ours streams requests (start_service checks): whatever does is never run.
            return None  # type: ignore[return-value]  # UNIMPLEMENTED
        return self._wrapped[method]

    def _rule_of(self, method: str) -> Rule:
        if method.startswith(self._prefix):
            return self._access.get(method.removeprefix(self._prefix), _NO_RULE)
        return _NO_RULE  # a method outside the table, or of another service: refused

    def _wrap(
        self,
        method: str,
        behavior: Callable[[Any, Any], Any],
        handler: grpc.RpcMethodHandler[Any, Any],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        call = _Call(method, self._rule_of(method))

        async def observed(request: Any, context: Any) -> Any:
            return await self._observe(call, behavior, request, context)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _observe(
        self, call: _Call, behavior: Callable[[Any, Any], Any], request: Any, context: Any
    ) -> Any:
        # Current in this task, so also in the worker (its context is a copy of this one).
        with served_rpc(call.method, context.invocation_metadata()) as span:
            return await self._run(call, behavior, request, context, span)

    async def _run(
        self,
        call: _Call,
        behavior: Callable[[Any, Any], Any],
        request: Any,
        context: Any,
        span: Span,
    ) -> Any:
        started = time.perf_counter()
        scope = CallScope(context)
        caller: list[Caller] = []  # set by the worker once the caller is known

        def log_outcome(code: grpc.StatusCode) -> None:
            # Before the status is sent: whoever sees the status can read the line.
            known = caller[0] if caller else None
            rpc_ended(span, code)
            _log_rpc(call.method, code, started, request, known, scope.log_fields)

        try:
            response = await asyncio.get_running_loop().run_in_executor(
                self._workers,
                contextvars.copy_context().run,
                self._handle,
                call,
                behavior,
                request,
                context,
                scope,
                caller,
            )
        except asyncio.CancelledError:
            # The call ended before its handler: stop its database work. A cancel request is a
            # connection of its own to the database: never on the event loop's thread.
            asyncio.get_running_loop().run_in_executor(None, scope.end_early)
            log_outcome(_early_end(context))
            raise
        except Exception as error:
            failure = _as_service_error(error, scope, call.method)
            log_outcome(failure.code)
            await _abort(context, failure)
        log_outcome(grpc.StatusCode.OK)
        return response

    def _wrap_stream(
        self,
        method: str,
        behavior: Callable[[Any, Any], AsyncIterator[Any]],
        handler: grpc.RpcMethodHandler[Any, Any],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        call = _Call(method, self._rule_of(method))

        async def observed(request: Any, context: Any) -> AsyncIterator[Any]:
            with served_rpc(call.method, context.invocation_metadata()) as span:
                async for response in self._stream(call, behavior, request, context, span):
                    yield response

        return grpc.unary_stream_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _stream(
        self,
        call: _Call,
        behavior: Callable[[Any, Any], AsyncIterator[Any]],
        request: Any,
        context: Any,
        span: Span,
    ) -> AsyncIterator[Any]:
        started = time.perf_counter()
        caller: list[Caller] = []

        def log_outcome(code: grpc.StatusCode) -> None:
            rpc_ended(span, code)
            _log_rpc(call.method, code, started, request, caller[0] if caller else None, {})

        try:
            # The token's signature check is CPU work: on a worker, like a unary call's.
            caller.append(
                await asyncio.get_running_loop().run_in_executor(
                    self._workers, self._authenticate, call.rule, context
                )
            )
            call.rule.check(caller[0], request)
            with calling_as(caller[0]):
                async for response in behavior(request, context):
                    yield response
        except asyncio.CancelledError:
            log_outcome(_early_end(context))
            raise
        except Exception as error:
            failure = _as_service_error(error, None, call.method)
            log_outcome(failure.code)
            await _abort(context, failure)
        log_outcome(grpc.StatusCode.OK)

    def _handle(
        self,
        call: _Call,
        behavior: Callable[[Any, Any], Any],
        request: Any,
        context: Any,
        scope: CallScope,
        caller: list[Caller],
    ) -> Any:
        """On a worker thread: who calls, may they, and the handler itself."""
        caller.append(self._authenticate(call.rule, context))
        call.rule.check(caller[0], request)
        with scope.entered(), calling_as(caller[0]):
            return behavior(request, context)

    def _authenticate(self, rule: Rule, context: Any) -> Caller:
        """The peer's workload, and the claims of its token. A token that is sent is checked
        even where the rule needs none: a forged credential is refused everywhere."""
        workload = peer_workload(context)
        authorization = next(
            (value for key, value in context.invocation_metadata() if key == "authorization"),
            None,
        )
        if authorization is None and not rule.needs_token:
            return Caller(workload, None)
        return Caller(workload, self._tokens.verify(authorization))


@dataclass(frozen=True)
class _Call:
    method: str
    rule: Rule


# Served to every holder of a certificate of the CA, without a token.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class _NoRule:
    """What a method missing from the access table gets: nobody may call it."""

    needs_token = False

    def check(self, caller: Caller, request: Any) -> None:
        raise PermissionDenied("this method has no access rule", reason="METHOD_NOT_ALLOWED")


_NO_RULE = _NoRule()


def _early_end(context: Any) -> grpc.StatusCode:
    """How a call that ended before its handler did ended: its deadline passed, or its client
    cancelled it (or went away)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


async def _abort(context: Any, error: ServiceError) -> None:
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


def _as_service_error(error: Exception, scope: CallScope | None, method: str) -> ServiceError:
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, _DATABASE_UNREACHABLE):
        return _database_failure(error, scope, method)
    # A bug: log it in full, tell the caller no more than that it was ours.
    log.error("unhandled error", exc_info=error, extra={"fields": {"method": method}})
    return ServiceError("internal error; it has been logged")


def _database_failure(error: Exception, scope: CallScope | None, method: str) -> ServiceError:
    if getattr(getattr(error, "orig", error), "pgcode", None) == QUERY_CANCELED:
        if scope is not None and scope.deadline_passed():
            return DeadlineExceeded("a database statement ran past the call's deadline")
        if scope is not None and scope.cancelled:
            return Cancelled("the call was cancelled")
        return DeadlineExceeded("a database statement ran past DB_STATEMENT_TIMEOUT_SECONDS")
    log.warning("database unreachable", exc_info=True, extra={"fields": {"method": method}})
    return Unavailable(
        "the database is unreachable; retry with backoff", reason="DATABASE_UNAVAILABLE"
    )


def _log_rpc(
    method: str,
    code: grpc.StatusCode,
    started: float,
    request: Any,
    caller: Caller | None,
    annotations: dict[str, object],
) -> None:
    """The call's one log line: what was asked, what came of it (handlers add to it through
    call_scope.annotate_log), how long it took."""
    seconds = time.perf_counter() - started
    RPCS.labels(method, code.name).inc()
    RPC_SECONDS.labels(method).observe(seconds)
    fields: dict[str, Any] = {
        "method": method,
        "code": code.name,
        "duration_ms": round(seconds * 1000, 2),
    }
    if caller is not None:
        fields["caller"] = caller.workload or ""
        if caller.claims is not None:
            fields["subject"] = excerpt_id(caller.claims.subject)
    declared = request.DESCRIPTOR.fields_by_name
    for name in _LOGGED_ID_FIELDS:
        if name in declared and (value := getattr(request, name)):
            fields[name] = excerpt_id(value)
    fields.update(annotations)
    log.info("rpc", extra={"fields": fields})


def excerpt_id(value: str) -> str:
    return value if len(value) <= _LOGGED_ID_CHARS else excerpt(value)
