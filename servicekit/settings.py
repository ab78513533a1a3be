"""Typed settings read from environment variables (each one is documented in the README)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_DATABASE_URL = "postgresql+psycopg2://ecommerce@127.0.0.1:55432/ecommerce"


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
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


def _float(env: Mapping[str, str], name: str, default: float) -> float:
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


@dataclass(frozen=True)
class ServiceSettings:
    """What a gRPC service process needs to start. One instance per service, built from the env."""

    service_name: str
    listen_host: str
    port: int
    database_url: str
    max_workers: int
    db_pool_size: int
    shutdown_grace_seconds: float
    health_check_interval_seconds: float
    log_level: str

    @classmethod
    def from_env(
        cls,
        service_name: str,
        port_variable: str,
        default_port: int,
        env: Mapping[str, str] | None = None,
    ) -> ServiceSettings:
        env = os.environ if env is None else env
        log_level = env.get("LOG_LEVEL", "INFO").upper()
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(
                f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}"
            )
        return cls(
            service_name=service_name,
            listen_host=env.get("GRPC_LISTEN_HOST", "127.0.0.1"),
            port=_int(env, port_variable, default_port),
            database_url=env.get("DATABASE_URL", DEFAULT_DATABASE_URL),
            max_workers=_int(env, "GRPC_MAX_WORKERS", 16, minimum=1),
            db_pool_size=_int(env, "DB_POOL_SIZE", 10, minimum=1),
            shutdown_grace_seconds=_float(env, "SHUTDOWN_GRACE_SECONDS", 10.0),
            health_check_interval_seconds=_float(env, "HEALTH_CHECK_INTERVAL_SECONDS", 2.0),
            log_level=log_level,
        )
