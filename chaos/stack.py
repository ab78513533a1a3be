"""The stack the fault suite drives: user_service, order_service and the processor as child
processes on fixed loopback ports, with a database and topics of the run's own. PostgreSQL and
Kafka are the ones `make infra-up` started; faults stop and start them through the same scripts."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from dataclasses import dataclass

from chaos.processes import REPO, ServiceProcess, free_port, wait_until
from servicekit.healthcheck import is_serving
from servicekit.kafka import ensure_topics, grant_access
from servicekit.local_credentials import CERTS_ENV, tls_of
from servicekit.schema import recreate_disposable_database
from servicekit.settings import KafkaSettings, TlsSettings

CHAOS_DATABASE_URL = os.environ.get(
    "CHAOS_DATABASE_URL", "postgresql+psycopg2://ecommerce@127.0.0.1:55432/ecommerce_chaos"
)


@dataclass(frozen=True)
class Part:
    module: str
    port_variable: str
    port: int


class Stack:
    def __init__(
        self, extra_env: dict[str, str] | None = None, database_url: str = CHAOS_DATABASE_URL
    ) -> None:
        self.database_url = database_url
        run = uuid.uuid4().hex[:8]
        self.parts = {
            "user_service": Part("user_service", "USER_SERVICE_PORT", free_port()),
            "order_service": Part("order_service", "ORDER_SERVICE_PORT", free_port()),
            "processor": Part("processor", "PROCESSOR_HEALTH_PORT", free_port()),
        }
        self.env = {
            "DATABASE_URL": database_url,
            "KAFKA_BOOTSTRAP_SERVERS": os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:59092"),
            "KAFKA_REPLICATION_FACTOR": os.environ.get("KAFKA_REPLICATION_FACTOR", "1"),
            "KAFKA_ORDERS_TOPIC": f"chaos-{run}.ecommerce.orders.v1",
            "KAFKA_USERS_TOPIC": f"chaos-{run}.ecommerce.users.v1",
            "KAFKA_ORDERS_DLQ_TOPIC": f"chaos-{run}.ecommerce.orders.v1.dlq",
            "PROCESSOR_GROUP_ID": f"chaos-{run}-order-processor",
            "ORDER_SERVICE_ADDRESS": self.address("order_service"),
            "OUTBOX_PUBLISH_TIMEOUT_SECONDS": "5",
            "HEALTH_CHECK_INTERVAL_SECONDS": "0.5",
            "SHUTDOWN_GRACE_SECONDS": "10",
            "GRPC_REFLECTION_ENABLED": "true",  # grpcurl and ghz read the descriptors
            "METRICS_PORT": "0",  # any free port: stacks run side by side
            **CERTS_ENV,
            **(extra_env or {}),
        }
        self.kafka = KafkaSettings.from_env(self.env, tls_of("admin"))
        self.processes: dict[str, ServiceProcess] = {}

    @property
    def client_tls(self) -> TlsSettings:
        """How a client of this stack connects: the `client` certificate, or plaintext."""
        return TlsSettings.from_env({**CERTS_ENV, **self.env}, "client")

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.parts[name].port}"

    def prepare(self) -> None:
        recreate_disposable_database(self.database_url)
        ensure_topics(self.kafka)
        grant_access(self.kafka, self.env["PROCESSOR_GROUP_ID"])

    def start(self, name: str) -> None:
        part = self.parts[name]
        log_dir = REPO / ".local" / "chaos"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.processes[name] = ServiceProcess(
            part.module,
            part.port_variable,
            self.env,
            port=part.port,
            log_path=log_dir / f"{name}.log",
        )

    def start_all(self) -> None:
        for name in self.parts:
            self.start(name)

    def kill(self, name: str, signum: signal.Signals = signal.SIGKILL) -> int:
        """Sends `signum` to the part (its own child process, by PID) and waits for it to exit."""
        process = self.processes.pop(name)
        process.process.send_signal(signum)
        return process.wait(timeout=60)

    def restart(self, name: str) -> None:
        self.start(name)
        assert wait_until(lambda: is_serving(self.address(name), self.client_tls), timeout=30), name

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.stop()
        self.processes.clear()


def infra(command: str) -> None:
    """`postgres up`, `kafka down`, `kafka stop-node 2 KILL`…: runs scripts/<first word>.sh with the
    rest as arguments, the same scripts as make infra-up (which stop only what they started)."""
    script, *arguments = command.split()
    subprocess.run(["bash", str(REPO / "scripts" / f"{script}.sh"), *arguments], check=True)
