"""Server bootstrap shared by every service: port, TLS, health, reflection, logs, graceful
shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # not in the stubs
from sqlalchemy import Engine

from servicekit.access import AccessTable
from servicekit.db import create_db_engine
from servicekit.interceptors import RpcBoundary
from servicekit.jsonlog import configure_logging
from servicekit.kafka import relay_transactional_id
from servicekit.metrics import DB_CONNECTIONS_IN_USE, MetricsEndpoint
from servicekit.outbox import OutboxRelay, event_source, oldest_unpublished_age
from servicekit.reflection import enable_reflection
from servicekit.settings import ServiceSettings, SettingsError, TlsSettings
from servicekit.sql import Database
from servicekit.tls import server_credentials
from servicekit.tokens import TokenVerifier
from servicekit.tracing import TracingSettings, start_tracing

log = logging.getLogger("servicekit.server")
T = TypeVar("T")


@dataclass(frozen=True)
class ServiceDefinition:
    """What a service contributes: its full proto name, how to add its servicer to a server, and
    who may call each of its methods."""

    full_name: str
    register: Callable[[grpc.aio.Server, ServiceResources], None]
    access: AccessTable


@dataclass(frozen=True)
class ServiceResources:
    """What a servicer is built from."""

    database: Database
    settings: ServiceSettings
    # Where async handlers (streams) run blocking work, as unary handlers run on it.
    workers: futures.Executor
    # What the servicer started and must stop with the service (called in order, once).
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    @property
    def event_source(self) -> str:
        """The CloudEvents ce_source of the events this service writes."""
        return event_source(self.settings.service_name)


class ServingLoop:
    """An asyncio event loop in a thread of its own, where a gRPC server reads requests and writes
    responses. Handlers stay synchronous and run on the server's thread pool, which a call enters
    only once its request has arrived: calls that send headers and never a message hold no worker
    (in grpc's synchronous server each would hold one)."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"{name}-loop", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs `coroutine` on the loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


@dataclass(frozen=True)
class Endpoint:
    """How a server listens and what it offers besides its own service."""

    name: str  # the health service name of what is served
    host: str
    port: int
    tls: TlsSettings
    reflection: bool
    options: Sequence[tuple[str, Any]] = ()
    maximum_concurrent_rpcs: int | None = None


class GrpcServer:
    """A started gRPC server with health (NOT_SERVING until told otherwise) and, when enabled,
    reflection, on a ServingLoop of its own."""

    def __init__(
        self,
        endpoint: Endpoint,
        workers: futures.ThreadPoolExecutor,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        register: Callable[[grpc.aio.Server], None] = lambda _server: None,
    ) -> None:
        self._workers = workers  # where synchronous handlers run
        self._loop = ServingLoop(endpoint.name)
        self._names = ["", endpoint.name]
        self._health = health_aio.HealthServicer()
        try:
            self._server, self.port = self._loop.run(self._start(endpoint, interceptors, register))
        except BaseException:
            self._loop.close()
            raise

    async def _start(
        self,
        endpoint: Endpoint,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]],
        register: Callable[[grpc.aio.Server], None],
    ) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            migration_thread_pool=self._workers,
            interceptors=interceptors,
            options=endpoint.options,
            maximum_concurrent_rpcs=endpoint.maximum_concurrent_rpcs,
        )
        register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if endpoint.reflection:
            enable_reflection([endpoint.name, health.SERVICE_NAME], server)
        await self._set_serving(False)
        port = _listen(server, endpoint)
        await server.start()
        return server, port

    def report(self, component: str, serving: bool) -> None:
        """The status of one part (e.g. `ecommerce.outbox`) under its own health name, or, for
        "", of the server and its service."""
        self._loop.run(self._set_serving(serving, [component] if component else None))

    async def _set_serving(self, serving: bool, names: Sequence[str] | None = None) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names if names is None else names:
            await self._health.set(name, status)

    def stop(self, grace_seconds: float) -> None:
        """Health turns NOT_SERVING, new RPCs are refused, in-flight ones get `grace_seconds`."""
        self._loop.run(self._stop(grace_seconds))
        self._loop.close()
        self._workers.shutdown(wait=False)

    async def _stop(self, grace_seconds: float) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_seconds)


def _listen(server: grpc.aio.Server, endpoint: Endpoint) -> int:
    address = f"{endpoint.host}:{endpoint.port}"
    try:
        if endpoint.tls.insecure:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, server_credentials(endpoint.tls))
    except RuntimeError as error:
        raise OSError(f"cannot listen on {address}: {error}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return bound


OUTBOX_HEALTH_NAME = "ecommerce.outbox"


class HealthWatch:
    """Health that tells the truth: runs `probe` every `interval` on a thread of its own; `probe`
    says, per component ("" for the server itself), whether it serves; each change is reported
    (GrpcServer.report) and logged."""

    def __init__(
        self,
        probe: Callable[[], dict[str, bool]],
        report: Callable[[str, bool], None],
        interval: float,
    ) -> None:
        self._probe = probe
        self._report = report
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)
        self._reported: dict[str, bool] = {}

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def check(self) -> None:
        for component, serving in self._probe().items():
            if self._reported.get(component) == serving or self._stopped.is_set():
                continue
            self._reported[component] = serving
            self._report(component, serving)
            log.log(
                logging.INFO if serving else logging.WARNING,
                "health changed",
                extra={"fields": {"component": component or "server", "serving": serving}},
            )

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.check()


def service_health(
    engine: Engine, source: str, max_age_seconds: float, relay: OutboxRelay | None
) -> Callable[[], dict[str, bool]]:
    """A service serves while its database answers; its outbox component while, also, its events
    get published: its relay (if it runs one here) is alive and the oldest of its unpublished
    events is younger than `max_age_seconds`. One query answers both."""

    def probe() -> dict[str, bool]:
        try:
            age = oldest_unpublished_age(engine, source)
        except Exception:  # the database does not answer, whatever the reason
            return {"": False, OUTBOX_HEALTH_NAME: False}
        relay_runs = relay is None or relay.is_alive()
        return {"": True, OUTBOX_HEALTH_NAME: relay_runs and age < max_age_seconds}

    return probe


class RunningService:
    """A started server and everything that must be released with it."""

    def __init__(
        self,
        server: GrpcServer,
        engine: Engine,
        monitor: HealthWatch,
        relay: OutboxRelay | None,
        metrics: MetricsEndpoint,
        on_stop: list[Callable[[], None]],
    ) -> None:
        self.server = server
        self.port = server.port
        self.metrics = metrics
        self.relay = relay
        self._engine = engine
        self._monitor = monitor
        self._on_stop = on_stop

    def stop(self, grace_seconds: float) -> None:
        """Reject new RPCs, give in-flight ones `grace_seconds` to finish, let the relay publish
        what they committed, then release the pool."""
        self._monitor.stop()
        self.server.stop(grace_seconds)
        for stop in self._on_stop:
            stop()
        if self.relay is not None:
            self.relay.stop()
        self._engine.dispose()
        self.metrics.stop()


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
        # Calls one connection may hold open at once (calls that never send their message hold
        # no worker, but each holds one of GRPC_MAX_CONCURRENT_RPCS until its deadline).
        ("grpc.max_concurrent_streams", 100),
    ]


def check_access_table(definition: ServiceDefinition) -> None:
    """Every method of the service takes one request and has a rule, and every rule names a
    method: a typo must not leave a method refused, nor a new method open."""
    service = descriptor_pool.Default().FindServiceByName(definition.full_name)
    methods = {method.name: method for method in service.methods}
    streaming = [m.name for m in methods.values() if m.client_streaming]
    missing, unknown = set(methods) - set(definition.access), set(definition.access) - set(methods)
    if streaming or missing or unknown:
        raise TypeError(
            f"{definition.full_name}: client streaming {sorted(streaming)}, without a rule"
            f" {sorted(missing)}, rules for no method {sorted(unknown)}"
        )


def start_service(definition: ServiceDefinition, settings: ServiceSettings) -> RunningService:
    """Builds and starts the server. Port 0 picks a free port, reported as `RunningService.port`."""
    check_access_table(definition)
    tokens = TokenVerifier(settings.auth)  # a missing key file stops the start, before any port
    engine = create_db_engine(settings)
    workers = futures.ThreadPoolExecutor(
        max_workers=settings.max_workers, thread_name_prefix=settings.service_name
    )
    resources = ServiceResources(Database(engine), settings, workers)
    try:
        server = GrpcServer(
            Endpoint(
                name=definition.full_name,
                host=settings.listen_host,
                port=settings.port,
                tls=settings.tls,
                reflection=settings.auth.reflection_enabled,
                options=server_options(settings),
                maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            ),
            workers,
            interceptors=[RpcBoundary(definition.full_name, definition.access, tokens, workers)],
            register=lambda server: definition.register(server, resources),
        )
    except BaseException:
        workers.shutdown(wait=False)
        engine.dispose()
        raise
    relay = None
    if settings.outbox.relay_enabled:
        relay = OutboxRelay(
            settings.database_url,
            settings.kafka,
            settings.outbox,
            event_source(settings.service_name),
            settings.service_name,
            relay_transactional_id(settings.kafka, settings.service_name),
        )
        relay.start()
    probe = service_health(
        engine, event_source(settings.service_name), settings.outbox.max_age_seconds, relay
    )
    monitor = HealthWatch(probe, server.report, settings.health_check_interval_seconds)
    monitor.start()
    DB_CONNECTIONS_IN_USE.set_function(engine.pool.checkedout)  # type: ignore[attr-defined]
    metrics = MetricsEndpoint(settings.metrics_host, settings.metrics_port)
    return RunningService(server, engine, monitor, relay, metrics, resources.on_stop)


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
    start_tracing(settings.service_name, TracingSettings.from_env(os.environ))
    stop_requested = install_stop_signals()
    try:
        running = start_service(definition, settings)
    except SettingsError as error:
        sys.exit(f"configuration error: {error}")
    log.info(
        "serving",
        extra={
            "fields": {
                "host": settings.listen_host,
                "port": running.port,
                "metrics_port": running.metrics.port,
            }
        },
    )
    stop_requested.wait()
    running.stop(settings.shutdown_grace_seconds)
    log.info("stopped")
