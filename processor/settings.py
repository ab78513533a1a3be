"""The processor's settings, from environment variables (documented in the README)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from processor.consumer import SESSION_TIMEOUT_MS, worst_loop_turn_seconds
from servicekit.settings import (
    KafkaSettings,
    SettingsError,
    TlsSettings,
    env_bool,
    env_float,
    env_int,
    env_text,
    parse_log_level,
)
from servicekit.tracing import TracingSettings


def _currencies(env: Mapping[str, str]) -> frozenset[str]:
    raw = env.get("ACCEPTED_CURRENCIES") or "USD,EUR,GBP"
    codes = frozenset(code.strip() for code in raw.split(",") if code.strip())
    if not codes or not all(re.fullmatch(r"[A-Z]{3}", code) for code in codes):
        raise SettingsError(f"ACCEPTED_CURRENCIES must be ISO 4217 codes like USD,EUR, got {raw!r}")
    return codes


# BatchUpdateOrderStatus takes at most this many changes.
MAX_BATCH_SIZE = 1000


def _batch_size(env: Mapping[str, str]) -> int:
    size = env_int(env, "PROCESSOR_BATCH_SIZE", 200, minimum=1)
    if size > MAX_BATCH_SIZE:
        raise SettingsError(f"PROCESSOR_BATCH_SIZE must be at most {MAX_BATCH_SIZE}, got {size}")
    return size


def _amount(env: Mapping[str, str], name: str, default: str) -> Decimal:
    raw = env.get(name) or default
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise SettingsError(f"{name} must be a decimal number, got {raw!r}") from None
    if not value.is_finite() or value <= 0:
        raise SettingsError(f"{name} must be positive, got {raw!r}")
    return value


def _max_poll_interval_ms(env: Mapping[str, str], timeout: float, retry_seconds: float) -> int:
    """At least the consumer's session timeout (the client refuses less), and longer than the
    longest loop turn the callback settings allow, or a slow turn gets the consumer evicted."""
    value = env_int(env, "PROCESSOR_MAX_POLL_INTERVAL_MS", 300_000, minimum=SESSION_TIMEOUT_MS)
    worst = worst_loop_turn_seconds(timeout, retry_seconds)
    if value <= worst * 1000:
        raise SettingsError(
            "PROCESSOR_MAX_POLL_INTERVAL_MS must exceed the longest loop turn, "
            f"CALLBACK_RETRY_SECONDS + 2 x CALLBACK_TIMEOUT_SECONDS = {worst * 1000:.0f} ms, "
            f"got {value}"
        )
    return value


@dataclass(frozen=True)
class ProcessorSettings:
    kafka: KafkaSettings
    tls: TlsSettings
    group_id: str
    order_service_address: str
    listen_host: str
    health_port: int
    accepted_currencies: frozenset[str]
    max_order_amount: Decimal
    callback_timeout_seconds: float
    callback_retry_seconds: float
    max_poll_interval_ms: int
    batch_size: int
    batch_linger_seconds: float
    log_level: str
    reflection_enabled: bool
    stall_seconds: float
    metrics_host: str
    metrics_port: int
    tracing: TracingSettings

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, identity: str = "processor"
    ) -> ProcessorSettings:
        """`identity`: whose certificate the process presents (the DLQ replay has its own)."""
        env = os.environ if env is None else env
        tls = TlsSettings.from_env(env, identity)
        order_service_address = env_text(env, "ORDER_SERVICE_ADDRESS", "127.0.0.1:50052")
        listen_host = env_text(env, "GRPC_LISTEN_HOST", "127.0.0.1")
        tls.require_loopback(order_service_address, "ORDER_SERVICE_ADDRESS")
        tls.require_loopback(listen_host, "GRPC_LISTEN_HOST")
        callback_timeout_seconds = env_float(env, "CALLBACK_TIMEOUT_SECONDS", 5.0)
        callback_retry_seconds = env_float(env, "CALLBACK_RETRY_SECONDS", 10.0)
        return cls(
            kafka=KafkaSettings.from_env(env, tls),
            tls=tls,
            group_id=env_text(env, "PROCESSOR_GROUP_ID", "order-processor"),
            order_service_address=order_service_address,
            listen_host=listen_host,
            health_port=env_int(env, "PROCESSOR_HEALTH_PORT", 50053),
            accepted_currencies=_currencies(env),
            max_order_amount=_amount(env, "MAX_ORDER_AMOUNT", "10000"),
            callback_timeout_seconds=callback_timeout_seconds,
            callback_retry_seconds=callback_retry_seconds,
            max_poll_interval_ms=_max_poll_interval_ms(
                env, callback_timeout_seconds, callback_retry_seconds
            ),
            batch_size=_batch_size(env),
            batch_linger_seconds=env_float(env, "PROCESSOR_BATCH_LINGER_SECONDS", 0.005),
            log_level=parse_log_level(env),
            reflection_enabled=env_bool(env, "GRPC_REFLECTION_ENABLED", False),
            stall_seconds=env_float(env, "PROCESSOR_STALL_SECONDS", 30.0),
            metrics_host=env_text(env, "METRICS_HOST", "127.0.0.1"),
            metrics_port=env_int(env, "METRICS_PORT", 51053),
            tracing=TracingSettings.from_env(env),
        )
