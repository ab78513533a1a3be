"""Reading the status and google.rpc details of a failed call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class RpcFailure:
    code: grpc.StatusCode
    message: str
    reason: str
    field_violations: dict[str, str]


def call_fails(call: Callable[..., Any], request: Any) -> RpcFailure:
    """Calls the RPC, expecting an error, and returns the status with its details decoded."""
    try:
        call(request)
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]  # it is also a grpc.Call
        reason, violations = "", {}
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations = {v.field: v.description for v in bad_request.field_violations}
        return RpcFailure(error.code(), error.details() or "", reason, violations)
    raise AssertionError(f"expected {call} to fail")
