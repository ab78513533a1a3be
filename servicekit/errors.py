"""Domain errors and their one mapping to gRPC statuses with google.rpc details (AIP-193)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "ecommerce.example.com"
# Status message and details travel in HTTP/2 trailers, which clients cap at 8 KiB by default:
# anything echoed from the request is cut to an excerpt.
_MAX_MESSAGE_CHARS = 400
_MAX_EXCERPT_CHARS = 40


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Status code number (UNKNOWN for one it does not know)."""
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)


def excerpt(value: str) -> str:
    """A short, printable quotation of client input for an error message."""
    if len(value) <= _MAX_EXCERPT_CHARS:
        return repr(value)
    return f"{value[:_MAX_EXCERPT_CHARS]!r}… ({len(value)} characters)"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ServiceError(Exception):
    """Raised by domain code; the server turns it into a status with an ErrorInfo reason."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, message: str, reason: str | None = None) -> None:
        message = message[:_MAX_MESSAGE_CHARS]
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason

    def details(self) -> list[any_pb2.Any]:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN))
        return [info]

    def to_rpc_status(self) -> status_pb2.Status:
        """As a google.rpc.Status message (a batch's per-item result)."""
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name),
            message=self.message,
            details=self.details(),
        )

    def to_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_rpc_status())


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str, reason: str | None = None) -> None:
        description = description[:_MAX_MESSAGE_CHARS]
        super().__init__(f"{field}: {description}", reason)
        self.violations = [FieldViolation(field, description)]

    def within(self, parent: str) -> InvalidArgument:
        """The same error about the field inside `parent`, e.g. `requests[2].reason`."""
        (violation,) = self.violations
        return InvalidArgument(f"{parent}.{violation.field}", violation.description, self.reason)

    def details(self) -> list[any_pb2.Any]:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
        )
        return [*super().details(), bad_request]


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(ServiceError):
    """A concurrent change got in the way; the whole request may be retried."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class ResourceExhausted(ServiceError):
    """The service sheds this call to stay within its capacity; retry after `retry_after`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: float, reason: str | None = None) -> None:
        super().__init__(message, reason)
        self.retry_after = retry_after

    def details(self) -> list[any_pb2.Any]:
        retry_info = error_details_pb2.RetryInfo()
        retry_info.retry_delay.FromNanoseconds(int(self.retry_after * 1e9))
        packed = any_pb2.Any()
        packed.Pack(retry_info)
        return [*super().details(), packed]


class Unauthenticated(ServiceError):
    """The call carries no credentials the service accepts."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """The caller is known, and may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"
