"""Mutual TLS for gRPC: server and channel credentials from a process's TlsSettings, and the
workload identity a peer's certificate proves (its SPIFFE ID)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from servicekit.settings import SettingsError, TlsSettings
from servicekit.tracing import TracedCalls

TRUST_DOMAIN = "ecommerce.local"
_SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SettingsError(
            f"cannot read the {what} {path!r} ({error.strerror}); run `make certs`"
        ) from None


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """Serves with the process's certificate and admits only clients whose certificate the CA
    signed: every caller is identified before a byte of its request is read."""
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "TLS key"), _read(tls.cert_file, "TLS certificate"))],
        root_certificates=_read(tls.ca_file, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "CA certificate"),
        private_key=_read(tls.key_file, "TLS key"),
        certificate_chain=_read(tls.cert_file, "TLS certificate"),
    )


def open_channel(
    address: str,
    tls: TlsSettings,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
    server_identity: str | None = None,
) -> grpc.Channel:
    """A channel to `address` presenting this process's certificate and, on every call, the
    bearer `token` if given (plaintext only when the settings say so, and only to loopback).
    With `server_identity`, the server's certificate must carry that name (as a DNS SAN, which
    only that workload's certificate does), not just be signed by the CA. Each call has a client
    span and sends its trace context."""
    if tls.insecure:
        tls.require_loopback(address, "the address called")
        channel = grpc.insecure_channel(address, options=options)
    else:
        if server_identity is not None:
            options = [*options, ("grpc.ssl_target_name_override", server_identity)]
        channel = grpc.secure_channel(address, channel_credentials(tls), options=options)
    if token is None:
        return grpc.intercept_channel(channel, TracedCalls())
    return grpc.intercept_channel(channel, TracedCalls(), BearerToken(token))


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds `authorization: Bearer <token>` to every call of a channel (unary or streamed)."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def _with_token(self, client_call_details: Any) -> Any:
        metadata = [*(client_call_details.metadata or ()), self._metadata]
        return client_call_details._replace(metadata=metadata)


def peer_workload(context: grpc.ServicerContext) -> str | None:
    """The workload a call's client certificate names (`processor` for
    spiffe://ecommerce.local/processor); None without TLS or for another trust domain."""
    values: Sequence[object] = context.auth_context().get("peer_spiffe_id") or []
    if len(values) != 1:
        return None
    spiffe_id = values[0].decode(errors="replace") if isinstance(values[0], bytes) else ""
    if not spiffe_id.startswith(_SPIFFE_PREFIX):
        return None
    return spiffe_id.removeprefix(_SPIFFE_PREFIX)
