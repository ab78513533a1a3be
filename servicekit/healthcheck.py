"""`python -m servicekit.healthcheck HOST:PORT [SERVICE]`: exit 0 when the server reports SERVING.

Used by the container health checks; needs nothing but the service's own image.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def is_serving(address: str, service: str = "", timeout: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
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
    sys.exit(0 if is_serving(address, service) else 1)
