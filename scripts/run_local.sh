#!/usr/bin/env bash
# `make run`: the services and the processor in the foreground, their JSON logs interleaved. Ctrl-C (or SIGTERM)
# stops exactly the processes started here, by PID, and waits for their graceful drain.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
run_dir=.local/run
mkdir -p "$run_dir"
python=.venv/bin/python
pids=()
# A development stack: reflection on, so that grpcurl needs no proto files.
export GRPC_REFLECTION_ENABLED=${GRPC_REFLECTION_ENABLED:-true}

start() { # module
  "$python" -m "$1" &
  pids+=($!)
  echo $! >"$run_dir/$1.pid"
}

stop_all() {
  trap - INT TERM
  echo "stopping ${pids[*]}" >&2
  kill -TERM "${pids[@]}" 2>/dev/null
  wait "${pids[@]}"
  rm -f "$run_dir"/*.pid
}
trap 'stop_all; exit 0' INT TERM

start user_service
start order_service
start processor

for port in "${USER_SERVICE_PORT:-50051}" "${ORDER_SERVICE_PORT:-50052}" "${PROCESSOR_HEALTH_PORT:-50053}"; do
  "$python" - "$port" <<'PY' || { stop_all; exit 1; }
import sys, time
import os
from servicekit.healthcheck import is_serving
from servicekit.settings import TlsSettings
tls = TlsSettings.from_env(os.environ, "client")
deadline = time.monotonic() + 30
while not is_serving(f"127.0.0.1:{sys.argv[1]}", tls):
    if time.monotonic() > deadline:
        sys.exit(f"nothing serving on port {sys.argv[1]} after 30 s")
    time.sleep(0.2)
PY
done

cat >&2 <<MSG

user_service, order_service and processor are up, over mutual TLS. Try (README: the walkthrough):
  export PATH="\$PWD/.local/bin:\$PATH"; C=.local/certs
  G="grpcurl -cacert \$C/ca.crt -cert \$C/client.crt -key \$C/client.key"
  ADMIN=\$(make -s token SUB=ops SCOPE=admin)
  \$G localhost:${USER_SERVICE_PORT:-50051} list
  \$G -H "authorization: Bearer \$ADMIN" -d '{"email":"ada@example.com","name":"Ada"}' localhost:${USER_SERVICE_PORT:-50051} ecommerce.v1.UserService/CreateUser
  \$G localhost:${PROCESSOR_HEALTH_PORT:-50053} grpc.health.v1.Health/Check
Ctrl-C stops all three.

MSG
# If one of them exits on its own, stop the others as well.
wait -n "${pids[@]}"
stop_all
