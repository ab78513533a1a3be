"""Retries of outgoing gRPC calls: exponential backoff with full jitter, bounded in time."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Collection
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

Request = TypeVar("Request")
Response = TypeVar("Response")

TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def call_with_retry(
    call: Callable[..., Response],
    request: Request,
    *,
    retryable: Collection[grpc.StatusCode],
    attempt_timeout: float,
    give_up_after: float,
    stop: threading.Event | None = None,
    first_delay: float = 0.05,
    max_delay: float = 2.0,
) -> Response:
    """Calls until success, a code not in `retryable`, `give_up_after` seconds, or `stop`; then
    raises the last grpc.RpcError. The last attempt starts by the deadline: the whole call takes at
    most `give_up_after` + `attempt_timeout`."""
    deadline = time.monotonic() + give_up_after
    delay = first_delay
    while True:
        try:
            return call(request, timeout=attempt_timeout)
        except grpc.RpcError as error:
            if error.code() not in retryable or (stop and stop.is_set()):
                raise
            asked_for = retry_delay(error)
            # No pause ends past the deadline, not even one the server asked for.
            if time.monotonic() + (asked_for or delay) > deadline:
                raise
        # The server's RetryInfo first; else full jitter: retries of many callers spread out.
        pause = asked_for or random.uniform(0, delay)
        if stop is not None:
            stop.wait(pause)
        else:
            time.sleep(pause)
        delay = min(delay * 2, max_delay)


def retry_delay(error: grpc.RpcError) -> float | None:
    """The delay a server asked for in a google.rpc.RetryInfo (e.g. when shedding load)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # it is also a grpc.Call
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            return float(retry_info.retry_delay.ToNanoseconds()) / 1e9
    return None
