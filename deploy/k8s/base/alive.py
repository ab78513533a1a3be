"""`python alive.py PORT`: exit 0 when the server on 127.0.0.1:PORT answers gRPC health at all."""

import os
import sys

from grpc_health.v1.health_pb2 import HealthCheckRequest
from grpc_health.v1.health_pb2_grpc import HealthStub

from servicekit.settings import TlsSettings
from servicekit.tls import open_channel

# SERVING or NOT_SERVING both prove the process is alive; an error (no answer in 3 s) does not.
tls = TlsSettings.from_env(os.environ, "client")  # TLS_*: the pod's own certificate
with open_channel(f"127.0.0.1:{sys.argv[1]}", tls) as channel:
    HealthStub(channel).Check(HealthCheckRequest(), timeout=3)
