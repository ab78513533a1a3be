"""Typed settings read from environment variables (each one is documented in the README)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

# The owner role, which runs the migrations; each service logs in as a role of its own.
DEFAULT_DATABASE_URL = "postgresql+psycopg2://ecommerce@127.0.0.1:55432/ecommerce"
LOCAL_DATABASE_URL = "postgresql+psycopg2://{role}@127.0.0.1:55432/ecommerce"


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes"}:
        return True
    if raw in {"0", "false", "no"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def env_text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name) or default
    if not value.strip():
        raise SettingsError(f"{name} must not be blank")
    return value.strip()


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "[::1]", "localhost"})


def is_loopback(address: str) -> bool:
    """Whether a host, or a host:port, names this machine's loopback interface."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or "]:" in address else address
    return host in LOOPBACK_HOSTS


def certs_dir_of(env: Mapping[str, str]) -> str:
    """Where `make certs` put the CA, the certificates and the token keys."""
    return env_text(env, "CERTS_DIR", ".local/certs")


@dataclass(frozen=True)
class TlsSettings:
    """A process's identity for mutual TLS (gRPC and Kafka): its certificate and key, signed by
    the CA it trusts. By default `CERTS_DIR/<identity>.crt|.key` and `CERTS_DIR/ca.crt`, as
    `make certs` writes them. `GRPC_INSECURE=true` turns TLS off for gRPC, on loopback only."""

    identity: str
    ca_file: str
    cert_file: str
    key_file: str
    insecure: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str], identity: str) -> TlsSettings:
        certs_dir = certs_dir_of(env)
        return cls(
            identity=identity,
            ca_file=env_text(env, "TLS_CA_FILE", f"{certs_dir}/ca.crt"),
            cert_file=env_text(env, "TLS_CERT_FILE", f"{certs_dir}/{identity}.crt"),
            key_file=env_text(env, "TLS_KEY_FILE", f"{certs_dir}/{identity}.key"),
            insecure=env_bool(env, "GRPC_INSECURE", False),
        )

    def require_loopback(self, address: str, variable: str) -> None:
        """Plaintext is refused anywhere but loopback, whatever the settings say."""
        if self.insecure and not is_loopback(address):
            raise SettingsError(
                f"GRPC_INSECURE=true is allowed on loopback only, but {variable} is {address!r}"
            )


@dataclass(frozen=True)
class AuthSettings:
    """How bearer tokens are checked: signed with EdDSA by the holder of the private key, checked
    with the public key (key rotation: restart with the new file)."""

    public_key_file: str
    issuer: str
    audience: str
    max_lifetime_seconds: float
    reflection_enabled: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AuthSettings:
        certs_dir = certs_dir_of(env)
        return cls(
            public_key_file=env_text(
                env, "AUTH_TOKEN_PUBLIC_KEY_FILE", f"{certs_dir}/token-signing.pub"
            ),
            issuer=env_text(env, "AUTH_TOKEN_ISSUER", "https://auth.ecommerce.local"),
            audience=env_text(env, "AUTH_TOKEN_AUDIENCE", "ecommerce"),
            # A stolen token is good until it expires (there is no revocation list): keep it short.
            max_lifetime_seconds=env_float(env, "AUTH_TOKEN_MAX_LIFETIME_SECONDS", 86400.0),
            reflection_enabled=env_bool(env, "GRPC_REFLECTION_ENABLED", False),
        )


_COMPRESSION_TYPES = ("none", "gzip", "snappy", "lz4", "zstd")
_KAFKA_PROTOCOLS = ("SSL", "PLAINTEXT")


def _compression(env: Mapping[str, str]) -> str:
    value = env_text(env, "KAFKA_COMPRESSION", "lz4").lower()
    if value not in _COMPRESSION_TYPES:
        raise SettingsError(f"KAFKA_COMPRESSION must be one of {', '.join(_COMPRESSION_TYPES)}")
    return value


@dataclass(frozen=True)
class KafkaSettings:
    """Where events go. Topic names are settings so that test runs can use topics of their own."""

    bootstrap_servers: str
    orders_topic: str
    users_topic: str
    orders_dlq_topic: str
    topic_partitions: int
    replication_factor: int
    compression: str
    # librdkafka's properties for how this process connects and who it is to the broker's ACLs.
    security: Mapping[str, str]

    @classmethod
    def from_env(cls, env: Mapping[str, str], tls: TlsSettings) -> KafkaSettings:
        return cls(
            bootstrap_servers=env_text(env, "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:59092"),
            orders_topic=env_text(env, "KAFKA_ORDERS_TOPIC", "ecommerce.orders.v1"),
            users_topic=env_text(env, "KAFKA_USERS_TOPIC", "ecommerce.users.v1"),
            orders_dlq_topic=env_text(env, "KAFKA_ORDERS_DLQ_TOPIC", "ecommerce.orders.v1.dlq"),
            topic_partitions=env_int(env, "KAFKA_TOPIC_PARTITIONS", 3, minimum=1),
            replication_factor=env_int(env, "KAFKA_REPLICATION_FACTOR", 1, minimum=1),
            compression=_compression(env),
            security=_kafka_security(env, tls),
        )

    def client_config(self, **overrides: Any) -> dict[str, Any]:
        """The base of every Kafka client's configuration: where the brokers are and who we are."""
        return {"bootstrap.servers": self.bootstrap_servers, **self.security, **overrides}


def _kafka_security(env: Mapping[str, str], tls: TlsSettings) -> dict[str, str]:
    """Mutual TLS: the broker maps the certificate's CN to the principal its ACLs name."""
    protocol = env_text(env, "KAFKA_SECURITY_PROTOCOL", "SSL").upper()
    if protocol not in _KAFKA_PROTOCOLS:
        raise SettingsError(f"KAFKA_SECURITY_PROTOCOL must be one of {', '.join(_KAFKA_PROTOCOLS)}")
    if protocol == "PLAINTEXT":
        for server in env_text(env, "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:59092").split(","):
            if not is_loopback(server.strip()):
                raise SettingsError(
                    f"KAFKA_SECURITY_PROTOCOL=PLAINTEXT is allowed on loopback only, but"
                    f" KAFKA_BOOTSTRAP_SERVERS names {server.strip()!r}"
                )
        return {"security.protocol": "plaintext"}
    return {
        "security.protocol": "ssl",
        "ssl.ca.location": tls.ca_file,
        "ssl.certificate.location": tls.cert_file,
        "ssl.key.location": tls.key_file,
    }


@dataclass(frozen=True)
class OutboxSettings:
    """How the outbox relay publishes committed events (see servicekit.outbox)."""

    relay_enabled: bool
    batch_size: int
    poll_interval_seconds: float
    linger_seconds: float
    publish_timeout_seconds: float
    max_age_seconds: float
    leader_lease_seconds: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OutboxSettings:
        settings = cls(
            relay_enabled=env_bool(env, "OUTBOX_RELAY_ENABLED", True),
            batch_size=env_int(env, "OUTBOX_BATCH_SIZE", 500, minimum=1),
            poll_interval_seconds=env_float(env, "OUTBOX_POLL_INTERVAL_SECONDS", 0.25),
            linger_seconds=env_float(env, "OUTBOX_LINGER_SECONDS", 0.005),
            publish_timeout_seconds=env_float(env, "OUTBOX_PUBLISH_TIMEOUT_SECONDS", 10.0),
            # Older than this, an unpublished event means publishing is stuck: health says so.
            max_age_seconds=env_float(env, "OUTBOX_MAX_AGE_SECONDS", 60.0),
            # A leader silent this long (paused, partitioned) loses its session and the lock.
            leader_lease_seconds=env_float(env, "OUTBOX_LEADER_LEASE_SECONDS", 10.0),
        )
        # The leader speaks to the database at least every poll interval and heartbeat.
        if settings.leader_lease_seconds < 2 * max(settings.poll_interval_seconds, 1.0):
            raise SettingsError(
                "OUTBOX_LEADER_LEASE_SECONDS must be at least twice"
                " max(OUTBOX_POLL_INTERVAL_SECONDS, 1)"
            )
        return settings


@dataclass(frozen=True)
class BackpressureSettings:
    """When a service sheds new work because accepted work is late (see servicekit.admission)."""

    enabled: bool
    delay_seconds: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BackpressureSettings:
        return cls(
            enabled=env_bool(env, "BACKPRESSURE_ENABLED", True),
            delay_seconds=env_float(env, "BACKPRESSURE_DELAY_SECONDS", 0.1),
        )


def database_url(env: Mapping[str, str], role: str) -> str:
    """DATABASE_URL (by default the local database, as the service's own role), with the
    password of its role."""
    return with_password(env.get("DATABASE_URL") or LOCAL_DATABASE_URL.format(role=role), env)


def read_secret(path: str, variable: str) -> str:
    """A secret from a file (`*_FILE` settings, compose and Kubernetes secrets): never from the
    environment itself, so that it stays out of `ps`, images and logs."""
    try:
        return Path(path).read_text().strip()
    except OSError as error:
        raise SettingsError(f"cannot read {variable} {path!r} ({error.strerror})") from None


def with_password(url: str, env: Mapping[str, str] | None = None) -> str:
    """`url` with its role's password: from DATABASE_PASSWORD_FILE, else from
    SECRETS_DIR/postgres-<role>.password when that file exists (what `make certs` writes). A URL
    that carries a password keeps it."""
    env = os.environ if env is None else env
    parsed = make_url(url)
    if parsed.password:
        return url
    path = env.get("DATABASE_PASSWORD_FILE")
    if not path:
        candidate = Path(env.get("SECRETS_DIR") or ".local/secrets") / (
            f"postgres-{parsed.username}.password"
        )
        if not candidate.is_file():
            return url
        path = str(candidate)
    password = read_secret(path, "DATABASE_PASSWORD_FILE")
    return parsed.set(password=password).render_as_string(hide_password=False)


def parse_log_level(env: Mapping[str, str]) -> str:
    level = env.get("LOG_LEVEL", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return level


@dataclass(frozen=True)
class ServiceSettings:
    """What a gRPC service process needs to start. One instance per service, built from the env."""

    service_name: str
    listen_host: str
    port: int
    database_url: str
    max_workers: int
    max_message_bytes: int
    max_concurrent_rpcs: int
    max_connection_idle_seconds: float
    max_connection_age_seconds: float
    db_pool_size: int
    db_statement_timeout_seconds: float
    shutdown_grace_seconds: float
    health_check_interval_seconds: float
    log_level: str
    kafka: KafkaSettings
    outbox: OutboxSettings
    backpressure: BackpressureSettings
    tls: TlsSettings
    auth: AuthSettings
    metrics_host: str
    metrics_port: int

    @classmethod
    def from_env(
        cls,
        service_name: str,
        port_variable: str,
        default_port: int,
        env: Mapping[str, str] | None = None,
    ) -> ServiceSettings:
        env = os.environ if env is None else env
        max_workers = env_int(env, "GRPC_MAX_WORKERS", 16, minimum=1)
        listen_host = env.get("GRPC_LISTEN_HOST", "127.0.0.1")
        tls = TlsSettings.from_env(env, service_name)
        tls.require_loopback(listen_host, "GRPC_LISTEN_HOST")
        return cls(
            service_name=service_name,
            listen_host=listen_host,
            port=env_int(env, port_variable, default_port),
            database_url=database_url(env, service_name),
            max_workers=max_workers,
            max_message_bytes=env_int(env, "GRPC_MAX_MESSAGE_BYTES", 1024 * 1024, minimum=1024),
            max_concurrent_rpcs=env_int(env, "GRPC_MAX_CONCURRENT_RPCS", 5000, minimum=1),
            max_connection_idle_seconds=env_float(env, "GRPC_MAX_CONNECTION_IDLE_SECONDS", 300.0),
            max_connection_age_seconds=env_float(env, "GRPC_MAX_CONNECTION_AGE_SECONDS", 1800.0),
            # One connection per RPC thread and one for the health probe: a pool smaller than
            # that opens and closes connections under load (measured: 4x the e2e latency).
            db_pool_size=env_int(env, "DB_POOL_SIZE", max_workers + 1, minimum=1),
            db_statement_timeout_seconds=env_float(env, "DB_STATEMENT_TIMEOUT_SECONDS", 30.0),
            shutdown_grace_seconds=env_float(env, "SHUTDOWN_GRACE_SECONDS", 10.0),
            health_check_interval_seconds=env_float(env, "HEALTH_CHECK_INTERVAL_SECONDS", 2.0),
            log_level=parse_log_level(env),
            kafka=KafkaSettings.from_env(env, tls),
            outbox=OutboxSettings.from_env(env),
            backpressure=BackpressureSettings.from_env(env),
            tls=tls,
            auth=AuthSettings.from_env(env),
            metrics_host=env_text(env, "METRICS_HOST", "127.0.0.1"),
            # /metrics, plain HTTP: loopback unless a scraper elsewhere needs it.
            metrics_port=env_int(env, "METRICS_PORT", default_port + 1000 if default_port else 0),
        )
