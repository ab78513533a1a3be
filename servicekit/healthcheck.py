"""`python -m servicekit.healthcheck HOST:PORT [SERVICE]`: exit 0 when the server reports SERVING.

Used by the container health checks; needs nothing but the service's own image. It presents the
certificate the TLS_* / CERTS_DIR settings name (by default the `client` identity's).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servicekit.settings import SettingsError, TlsSettings
from servicekit.tls import open_channel


def is_serving(
    address: str,
    tls: TlsSettings,
    service: str = "",
    timeout: float = 3.0,
    server_identity: str | None = None,
) -> bool:
    """`server_identity`: the name the server's certificate must carry, when `address` is not
    one it names (an address of a network namespace)."""
    with open_channel(address, tls, server_identity=server_identity) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m servicekit.healthcheck HOST:PORT [SERVICE]")
    address, service = sys.argv[1], (sys.argv[2] if len(sys.argv) == 3 else "")
    try:
        tls = TlsSettings.from_env(os.environ, "client")
        sys.exit(0 if is_serving(address, tls, service) else 1)
    except SettingsError as error:
        sys.exit(f"configuration error: {error}")
