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

from servicekit.db import create_db_engine, database_answers
from servicekit.interceptors import RpcBoundary
from servicekit.jsonlog import configure_logging
from servicekit.outbox import OutboxRelay, event_source
from servicekit.settings import ServiceSettings, SettingsError
from servicekit.sql import Database

log = logging.getLogger("servicekit.server")


@dataclass(frozen=True)
class ServiceDefinition:
    """What a service contributes: its full proto name and how to add its servicer to a server."""

    full_name: str
    register: Callable[[grpc.Server, ServiceResources], None]


@dataclass(frozen=True)
class ServiceResources:
    """What a servicer is built from."""

    database: Database
    settings: ServiceSettings

    @property
    def event_source(self) -> str:
        """The CloudEvents ce_source of the events this service writes."""
        return event_source(self.settings.service_name)


def set_serving(health_servicer: health.HealthServicer, names: list[str], serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in names:
        health_servicer.set(name, status)


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
        set_serving(self._health, self._names, serving)
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
        relay: OutboxRelay | None,
    ) -> None:
        self.server = server
        self.port = port
        self.relay = relay
        self._engine = engine
        self._health = health_servicer
        self._monitor = monitor

    def stop(self, grace_seconds: float) -> None:
        """Reject new RPCs, give in-flight ones `grace_seconds` to finish, let the relay publish
        what they committed, then release the pool."""
        self._monitor.stop()
        self._health.enter_graceful_shutdown()
        self.server.stop(grace_seconds).wait()
        if self.relay is not None:
            self.relay.stop()
        self._engine.dispose()


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Bounds on what one client can make the server hold: message size, idle and old
    connections (closed, so that clients reconnect and spread over replicas), and keepalive
    pings (a client pinging more often than every 30 s without calls is disconnected)."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_seconds * 1000)),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace_seconds * 1000)),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def start_service(definition: ServiceDefinition, settings: ServiceSettings) -> RunningService:
    """Builds and starts the server. Port 0 picks a free port, reported as `RunningService.port`."""
    engine = create_db_engine(settings)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.max_workers, thread_name_prefix=settings.service_name
        ),
        interceptors=[RpcBoundary()],
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    definition.register(
        server,
        ServiceResources(Database(engine), settings),
    )
    health_servicer = _add_health_and_reflection(server, definition.full_name)
    try:
        port = _listen(server, settings.listen_host, settings.port)
    except OSError:
        engine.dispose()
        raise

    monitor = DatabaseHealthMonitor(
        engine, health_servicer, ["", definition.full_name], settings.health_check_interval_seconds
    )
    monitor.start()
    relay = None
    if settings.outbox.relay_enabled:
        relay = OutboxRelay(
            settings.database_url,
            settings.kafka,
            settings.outbox,
            event_source(settings.service_name),
            settings.service_name,
        )
        relay.start()
    server.start()
    return RunningService(server, port, engine, health_servicer, monitor, relay)


def _add_health_and_reflection(server: grpc.Server, service_name: str) -> health.HealthServicer:
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return health_servicer


def _listen(server: grpc.Server, host: str, port: int) -> int:
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return bound


class HealthServer:
    """A gRPC server with only health and reflection, for a process that serves no RPCs of its
    own (the processor), so that it is watched like the services."""

    def __init__(self, host: str, port: int, service_name: str) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._health = _add_health_and_reflection(self._server, service_name)
        self._names = ["", service_name]
        self.port = _listen(self._server, host, port)
        self.set_serving(False)
        self._server.start()

    def set_serving(self, serving: bool) -> None:
        set_serving(self._health, self._names, serving)

    def stop(self) -> None:
        self._health.enter_graceful_shutdown()
        self._server.stop(1).wait()


def install_stop_signals() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT."""
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop_requested


def serve(definition: ServiceDefinition, settings_loader: Callable[[], ServiceSettings]) -> None:
    """Entry point of a service process: runs until SIGTERM or SIGINT, then drains and exits 0."""
    try:
        settings = settings_loader()
    except SettingsError as error:
        sys.exit(f"configuration error: {error}")
    configure_logging(settings.service_name, settings.log_level)
    stop_requested = install_stop_signals()
    running = start_service(definition, settings)
    log.info("serving", extra={"fields": {"host": settings.listen_host, "port": running.port}})
    stop_requested.wait()
    running.stop(settings.shutdown_grace_seconds)
    log.info("stopped")
