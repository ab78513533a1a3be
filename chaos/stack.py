"""The stack the fault suite drives: user_service, order_service and the processor as child
processes on fixed ports, each in one or more replicas, with a database and topics of the run's
own. PostgreSQL and Kafka are the ones `make infra-up` started; faults stop and start them through
the same scripts. One replica may run in a network namespace of the run's own (chaos/netns.py),
where partitions cut it off from PostgreSQL or Kafka."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import Engine, make_url, text

from chaos.load import SERVER_NAME
from chaos.netns import Namespace
from servicekit.healthcheck import is_serving
from servicekit.kafka import ensure_topics, grant_access
from servicekit.local_credentials import CERTS_ENV, tls_of
from servicekit.outbox import RELAY_LOCK_CLASS
from servicekit.schema import recreate_disposable_database
from servicekit.settings import KafkaSettings, TlsSettings
from testsupport.processes import REPO, ServiceProcess, free_port, wait_until

CHAOS_DATABASE_URL = os.environ.get(
    "CHAOS_DATABASE_URL", "postgresql+psycopg2://ecommerce@127.0.0.1:55432/ecommerce_chaos"
)
# Half the default: a paused relay leader is replaced sooner, and the suite runs shorter.
RELAY_LEASE_SECONDS = 5.0
SERVICES = {  # module: the variable of its port
    "user_service": "USER_SERVICE_PORT",
    "order_service": "ORDER_SERVICE_PORT",
    "processor": "PROCESSOR_HEALTH_PORT",
}


@dataclass(frozen=True)
class Part:
    """One replica: `service` is the module it runs."""

    service: str
    port_variable: str
    port: int
    isolated: bool = False


class Stack:
    def __init__(
        self,
        extra_env: dict[str, str] | None = None,
        database_url: str = CHAOS_DATABASE_URL,
        replicas: int = 1,
        isolate: str | None = None,
    ) -> None:
        """`replicas` of each service, named `<service>-<n>` (just `<service>` when one);
        `isolate`: the replica to run in a network namespace of its own."""
        self.database_url = database_url
        run = uuid.uuid4().hex[:8]
        self.parts = {
            (service if replicas == 1 else f"{service}-{n}"): Part(service, variable, free_port())
            for service, variable in SERVICES.items()
            for n in range(1, replicas + 1)
        }
        self.env = {
            "DATABASE_URL": database_url,
            "KAFKA_BOOTSTRAP_SERVERS": os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:59092"),
            "KAFKA_REPLICATION_FACTOR": os.environ.get("KAFKA_REPLICATION_FACTOR", "1"),
            "KAFKA_ORDERS_TOPIC": f"chaos-{run}.ecommerce.orders.v1",
            "KAFKA_USERS_TOPIC": f"chaos-{run}.ecommerce.users.v1",
            "KAFKA_ORDERS_DLQ_TOPIC": f"chaos-{run}.ecommerce.orders.v1.dlq",
            "PROCESSOR_GROUP_ID": f"chaos-{run}-order-processor",
            "OUTBOX_PUBLISH_TIMEOUT_SECONDS": "5",
            "OUTBOX_LEADER_LEASE_SECONDS": str(RELAY_LEASE_SECONDS),
            "HEALTH_CHECK_INTERVAL_SECONDS": "0.5",
            "SHUTDOWN_GRACE_SECONDS": "10",
            "GRPC_REFLECTION_ENABLED": "true",  # grpcurl and ghz read the descriptors
            "METRICS_PORT": "0",  # any free port: stacks run side by side
            **CERTS_ENV,
            **(extra_env or {}),
        }
        self.kafka = KafkaSettings.from_env(self.env, tls_of("admin"))
        self.namespace: Namespace | None = None
        if isolate is not None:
            self.parts[isolate] = replace(self.parts[isolate], isolated=True)
            # The ports the replica inside reaches on the host's loopback: PostgreSQL, then Kafka.
            kafka_ports = sorted(
                {
                    int(address.rsplit(":", 1)[1])
                    for address in self.kafka.bootstrap_servers.split(",")
                }
            )
            self.namespace = Namespace([make_url(database_url).port or 5432, *kafka_ports])
        self.processes: dict[str, ServiceProcess] = {}

    @property
    def client_tls(self) -> TlsSettings:
        """How a client of this stack connects: the `client` certificate, or plaintext."""
        return TlsSettings.from_env({**CERTS_ENV, **self.env}, "client")

    def replicas(self, service: str) -> list[str]:
        return [name for name, part in self.parts.items() if part.service == service]

    def address(self, name: str) -> str:
        """Where a replica (or a service's first replica) is reached from the host."""
        part = self.parts.get(name) or self.parts[self.replicas(name)[0]]
        host = self.namespace.address if part.isolated and self.namespace else "127.0.0.1"
        return f"{host}:{part.port}"

    def addresses(self, service: str) -> list[str]:
        return [self.address(name) for name in self.replicas(service)]

    def _env_of(self, name: str) -> dict[str, str]:
        part = self.parts[name]
        env = dict(self.env)
        if part.service == "processor":
            # Every order_service replica, starting with a different one per processor: the
            # default pick_first policy sticks to one and moves on when it is gone.
            targets = self.addresses("order_service")
            first = self.replicas("processor").index(name) % len(targets)
            env["ORDER_SERVICE_ADDRESS"] = "ipv4:" + ",".join(targets[first:] + targets[:first])
        if part.isolated and self.namespace:
            env["GRPC_LISTEN_HOST"] = self.namespace.address
        return env

    def prepare(self) -> None:
        recreate_disposable_database(self.database_url)
        ensure_topics(self.kafka)
        grant_access(self.kafka, self.env["PROCESSOR_GROUP_ID"])
        if self.namespace:
            self.namespace.create()

    def start(self, name: str) -> None:
        part = self.parts[name]
        log_dir = REPO / ".local" / "chaos"
        log_dir.mkdir(parents=True, exist_ok=True)
        inside = part.isolated and self.namespace is not None
        self.processes[name] = ServiceProcess(
            part.service,
            part.port_variable,
            self._env_of(name),
            port=part.port,
            log_path=log_dir / f"{name}.log",
            command_prefix=self.namespace.exec_prefix if self.namespace and inside else (),
            host=self.address(name).rsplit(":", 1)[0],
        )

    def start_all(self) -> None:
        # Isolated replicas first: the relay of the first order_service to start leads.
        for name in sorted(self.parts, key=lambda name: not self.parts[name].isolated):
            self.start(name)

    def kill(self, name: str, signum: signal.Signals = signal.SIGKILL) -> int:
        """Sends `signum` to the part (its own child process, by PID) and waits for it to exit."""
        process = self.processes.pop(name)
        process.process.send_signal(signum)
        return process.wait(timeout=60)

    def send(self, name: str, signum: signal.Signals) -> None:
        """Sends `signum` to the part (its own child process, by PID), which keeps running."""
        self.processes[name].process.send_signal(signum)

    def is_serving(self, name: str, timeout: float = 3.0) -> bool:
        return is_serving(
            self.address(name), self.client_tls, timeout=timeout, server_identity=SERVER_NAME
        )

    def restart(self, name: str) -> None:
        self.start(name)
        assert wait_until(lambda: self.is_serving(name), timeout=30), name

    def relay_leader(self, engine: Engine, service: str) -> str | None:
        """The replica whose relay holds `service`'s leader lock (None: no relay leads now).
        PostgreSQL says which client port holds it; the replica is the process owning a socket
        of that local port (as the owner role, a member of pg_read_all_stats)."""
        query = text(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = CAST(:class AS oid)"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND a.application_name = :application"
        )
        with engine.connect() as connection:
            port = connection.scalar(
                query, {"class": RELAY_LOCK_CLASS, "application": f"{service}-relay"}
            )
        if port is None:
            return None
        for name in self.replicas(service):
            process = self.processes.get(name)
            if process and int(port) in _local_ports(process.process.pid):
                return name
        return None

    def stop_all(self) -> None:
        try:
            for process in self.processes.values():
                process.stop()
            self.processes.clear()
        finally:
            if self.namespace:
                self.namespace.destroy()


def _local_ports(pid: int) -> set[int]:
    """Local ports of the TCP sockets process `pid` holds (read in its own network namespace)."""
    try:
        inodes = {
            os.readlink(fd)[len("socket:[") : -1]
            for fd in Path(f"/proc/{pid}/fd").iterdir()
            if os.readlink(fd).startswith("socket:[")
        }
        ports = set()
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    except OSError:  # the process exited meanwhile
        return set()
    return ports


def infra(command: str) -> None:
    """`postgres up`, `kafka down`, `kafka stop-node 2 KILL`…: runs scripts/<first word>.sh with the
    rest as arguments, the same scripts as make infra-up (which stop only what they started)."""
    script, *arguments = command.split()
    subprocess.run(["bash", str(REPO / "scripts" / f"{script}.sh"), *arguments], check=True)
