"""A failed call's status and its google.rpc details (AIP-193), decoded."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from servicekit.errors import status_code


@dataclass
class RpcFailure:
    """What a server said went wrong: the code, its message, the ErrorInfo reason (e.g.
    ORDER_NOT_FOUND), the BadRequest field violations and a RetryInfo delay, when given."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    field_violations: dict[str, str] = field(default_factory=dict)
    retry_delay_seconds: float | None = None

    def describe(self) -> str:
        """Lines for a person: `NOT_FOUND (ORDER_NOT_FOUND): …`, then one per field violation."""
        reason = f" ({self.reason})" if self.reason else ""
        lines = [f"{self.code.name}{reason}: {self.message}"]
        lines += [f"  field {name}: {text}" for name, text in self.field_violations.items()]
        if self.retry_delay_seconds is not None:
            lines.append(f"  retry after {self.retry_delay_seconds:g} s")
        return "\n".join(lines)


def failure_of(status: status_pb2.Status) -> RpcFailure:
    """A google.rpc.Status (as a call's trailer or a batch's per-item result), decoded."""
    failure = RpcFailure(status_code(status.code), status.message)
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


def failure_of_error(error: grpc.RpcError) -> RpcFailure:
    """The status a failed call ended with, from its `grpc-status-details-bin` trailer when the
    server sent one (ours always do), else from its code and message alone."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # it is also a grpc.Call
    if status is None:
        return RpcFailure(error.code(), error.details() or "")
    return failure_of(status)


class CallFailed(Exception):
    """Raised by EcommerceClient when a call fails; `failure` holds the decoded status, and the
    grpc.RpcError is the cause."""

    def __init__(self, method: str, failure: RpcFailure) -> None:
        super().__init__(f"{method}: {failure.describe()}")
        self.method = method
        self.failure = failure

    @property
    def code(self) -> grpc.StatusCode:
        return self.failure.code

    @property
    def reason(self) -> str:
        return self.failure.reason
