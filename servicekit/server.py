"""Server bootstrap shared by every service: port, health, reflection, logs, graceful shutdown."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine

from servicekit.db import SessionFactory, create_db_engine, database_answers, session_factory
from servicekit.interceptors import RpcBoundary
from servicekit.jsonlog import configure_logging
from servicekit.settings import ServiceSettings, SettingsError

log = logging.getLogger("servicekit.server")


@dataclass(frozen=True)
class ServiceDefinition:
    """What a service contributes: its full proto name and how to add its servicer to a server."""

    full_name: str
    register: Callable[[grpc.Server, SessionFactory], None]


class DatabaseHealthMonitor:
    """Reports NOT_SERVING for the service while its database does not answer."""

    def __init__(
        self,
        engine: Engine,
        health_servicer: health.HealthServicer,
        names: list[str],
        interval: float,
    ) -> None:
        self._engine = engine
        self._health = health_servicer
        self._names = names
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="db-health", daemon=True)
        self._serving: bool | None = None

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def check(self) -> None:
        serving = database_answers(self._engine)
        if serving == self._serving or self._stopped.is_set():
            return
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            self._health.set(name, status)
        log.log(
            logging.INFO if serving else logging.WARNING,
            "health changed",
            extra={"fields": {"serving": serving}},
        )

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.check()


class RunningService:
    """A started server and everything that must be released with it."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        engine: Engine,
        health_servicer: health.HealthServicer,
        monitor: DatabaseHealthMonitor,
    ) -> None:
        self.server = server
        self.port = port
        self._engine = engine
        self._health = health_servicer
        self._monitor = monitor

    def stop(self, grace_seconds: float) -> None:
        """Reject new RPCs, give in-flight ones `grace_seconds` to finish, then release the pool."""
        self._monitor.stop()
        self._health.enter_graceful_shutdown()
        self.server.stop(grace_seconds).wait()
        self._engine.dispose()


def start_service(definition: ServiceDefinition, settings: ServiceSettings) -> RunningService:
    """Builds and starts the server. Port 0 picks a free port, reported as `RunningService.port`."""
    engine = create_db_engine(settings)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.max_workers, thread_name_prefix=settings.service_name
        ),
        interceptors=[RpcBoundary()],
    )
    definition.register(server, session_factory(engine))

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [definition.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(f"{settings.listen_host}:{settings.port}")
    if port == 0:
        engine.dispose()
        raise OSError(f"cannot listen on {settings.listen_host}:{settings.port}")

    monitor = DatabaseHealthMonitor(
        engine, health_servicer, ["", definition.full_name], settings.health_check_interval_seconds
    )
    monitor.start()
    server.start()
    return RunningService(server, port, engine, health_servicer, monitor)


def serve(definition: ServiceDefinition, settings_loader: Callable[[], ServiceSettings]) -> None:
    """Entry point of a service process: runs until SIGTERM or SIGINT, then drains and exits 0."""
    try:
        settings = settings_loader()
    except SettingsError as error:
        sys.exit(f"configuration error: {error}")
    configure_logging(settings.service_name, settings.log_level)

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    running = start_service(definition, settings)
    log.info("serving", extra={"fields": {"host": settings.listen_host, "port": running.port}})
    stop_requested.wait()
    running.stop(settings.shutdown_grace_seconds)
    log.info("stopped")
