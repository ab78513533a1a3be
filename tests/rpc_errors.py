"""Reading the status and google.rpc details of a failed call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from servicekit.errors import status_code


@dataclass
class RpcFailure:
    code: grpc.StatusCode
    message: str
    reason: str
    field_violations: dict[str, str]
    retry_delay_seconds: float | None = None  # from a google.rpc.RetryInfo


def failure_of(status: status_pb2.Status) -> RpcFailure:
    """A google.rpc.Status (as a call's trailer or a batch's per-item result), decoded."""
    failure = RpcFailure(status_code(status.code), status.message, "", {})
    info = error_details_pb2.ErrorInfo()
    bad_request = error_details_pb2.BadRequest()
    retry_info = error_details_pb2.RetryInfo()
    for detail in status.details:  # Unpack answers whether the detail is of that type
        if detail.Unpack(info):
            failure.reason = info.reason
        elif detail.Unpack(bad_request):
            failure.field_violations = {
                v.field: v.description for v in bad_request.field_violations
            }
        elif detail.Unpack(retry_info):
            failure.retry_delay_seconds = retry_info.retry_delay.ToNanoseconds() / 1e9
    return failure


def call_fails(call: Callable[..., Any], request: Any) -> RpcFailure:
    """Calls the RPC, expecting an error, and returns the status with its details decoded."""
    try:
        call(request)
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]  # it is also a grpc.Call
        if status is None:
            return RpcFailure(error.code(), error.details() or "", "", {})
        return failure_of(status)
    raise AssertionError(f"expected {call} to fail")
