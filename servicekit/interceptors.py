"""The one place where RPC outcomes are decided for logging and where errors become statuses."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import psycopg2
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from servicekit.call_scope import CallScope
from servicekit.errors import Cancelled, DeadlineExceeded, ServiceError, Unavailable, excerpt

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


class RpcBoundary(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Maps domain errors to gRPC statuses and writes one JSON access-log line per unary RPC."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming (health Watch, reflection): nothing of ours to map
        method: str = handler_call_details.method
        behavior = handler.unary_unary

        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            scope = CallScope(context)
            try:
                with scope.entered():
                    return behavior(request, context)
            except ServiceError as error:
                code = error.code
                context.abort_with_status(error.to_status())
            except _DATABASE_UNREACHABLE as error:
                failure = _database_failure(error, scope, method)
                code = failure.code
                context.abort_with_status(failure.to_status())
            except Exception:
                if (aborted_with := _code_set_by_handler(context)) is not None:
                    code = aborted_with
                    raise
                # A bug: log it in full, tell the caller no more than that it was ours.
                log.exception("unhandled error", extra={"fields": {"method": method}})
                code = grpc.StatusCode.INTERNAL
                context.abort(code, "internal error; it has been logged")
            finally:
                _log_rpc(method, code, started, request, scope.log_fields)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _database_failure(error: Exception, scope: CallScope, method: str) -> ServiceError:
    if getattr(getattr(error, "orig", error), "pgcode", None) == QUERY_CANCELED:
        if scope.deadline_passed():
            return DeadlineExceeded("a database statement ran past the call's deadline")
        if scope.cancelled:
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
    annotations: dict[str, object],
) -> None:
    """The call's one log line: what was asked, what came of it (handlers add to it through
    call_scope.annotate_log), how long it took."""
    fields: dict[str, Any] = {
        "method": method,
        "code": code.name,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    declared = request.DESCRIPTOR.fields_by_name
    for name in _LOGGED_ID_FIELDS:
        if name in declared and (value := getattr(request, name)):
            fields[name] = value if len(value) <= _LOGGED_ID_CHARS else excerpt(value)
    fields.update(annotations)
    log.info("rpc", extra={"fields": fields})


def _code_set_by_handler(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status a handler set before raising (e.g. through `context.abort`), if any."""
    code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]  # not in the stubs
    return code
