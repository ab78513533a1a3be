"""Reading the status and google.rpc details of a failed call (decoded by the client package)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from ecommerce_client.errors import RpcFailure, failure_of, failure_of_error

__all__ = ["RpcFailure", "call_fails", "failure_of"]


def call_fails(call: Callable[..., Any], request: Any) -> RpcFailure:
    """Calls the RPC, expecting an error, and returns the status with its details decoded."""
    try:
        call(request)
    except grpc.RpcError as error:
        return failure_of_error(error)
    raise AssertionError(f"expected {call} to fail")
