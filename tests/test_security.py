"""Who may call what, on the real servers and the real broker: every method against every kind of
caller (no token, bad tokens, users, the admin, each workload's certificate), certificates of
another CA, calls that send their headers and never their message, and the Kafka ACLs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc
from google.protobuf.message import Message
from google.type import money_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine, text

from order_service.service import ACCESS as ORDER_ACCESS
from servicekit import local_credentials as credentials
from servicekit.errors import Unauthenticated
from servicekit.kafka import Headers, cloudevent_headers, producer_config
from servicekit.local_credentials import AUTH, CERTS_DIR, tls_of
from servicekit.outbox import event_source
from servicekit.server import RunningService, start_service
from servicekit.settings import KafkaSettings
from servicekit.tls import open_channel
from servicekit.tokens import ALGORITHM, TokenVerifier
from tests.conftest import PROCESSOR_GROUP, REPO, TEST_ENV, service_settings, unique_email
from tests.rpc_errors import call_fails
from user_service.service import ACCESS as USER_ACCESS
from user_service.service import DEFINITION as USER_SERVICE

# --- Tokens: the real signing key, and what an attacker can make without it ---------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(
    subject: str = credentials.ADMIN_SUBJECT, scope: str = "admin", **changes: Any
) -> dict[str, Any]:
    """Valid claims for `subject`; a change to None leaves that claim out."""
    now = int(datetime.now(UTC).timestamp())
    valid = {
        "iss": AUTH.issuer,
        "aud": AUTH.audience,
        "sub": subject,
        "scope": scope,
        "iat": now,
        "exp": now + 3600,
        "jti": str(uuid.uuid4()),
    }
    return {k: v for k, v in {**valid, **changes}.items() if v is not None}


def signed(payload: dict[str, Any]) -> str:
    """Signed with the real key, as the issuer would."""
    return jwt.encode(payload, (CERTS_DIR / "token-signing.key").read_bytes(), ALGORITHM)


def forged(payload: dict[str, Any]) -> str:
    """Well formed, signed with EdDSA, but by a key the services do not know."""
    return jwt.encode(payload, Ed25519PrivateKey.generate(), ALGORITHM)


def unsigned(payload: dict[str, Any]) -> str:
    """`alg: none`, empty signature (built by hand: PyJWT will not verify these)."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(payload).encode())}."


def hmac_with_public_key(payload: dict[str, Any]) -> str:
    """HS256 with the services' public key bytes as the HMAC secret: the classic algorithm
    confusion, which works on a verifier that lets the token choose its alg."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64url(json.dumps(payload).encode())}"
    public_key = (CERTS_DIR / "token-signing.pub").read_bytes()  # what the services verify with
    signature = hmac.new(public_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


# --- The world the calls are made in -------------------------------------------------------------

ONE_DOLLAR = money_pb2.Money(currency_code="USD", units=1)


@dataclass(frozen=True)
class World:
    owner: users_pb2.User  # the user whose resources the calls ask for
    other: users_pb2.User
    order: orders_pb2.Order  # the owner's
    admin_orders: orders_pb2_grpc.OrderServiceStub

    def fresh_order(self) -> orders_pb2.Order:
        """A new CREATED order of the owner's, for a call that may settle it."""
        order: orders_pb2.Order = self.admin_orders.CreateOrder(
            orders_pb2.CreateOrderRequest(user_id=self.owner.id, amount=ONE_DOLLAR)
        )
        return order

    def cancelled_order(self) -> orders_pb2.Order:
        """A new order of the owner's in a final status: a watch of it ends at once."""
        order: orders_pb2.Order = self.admin_orders.CancelOrder(
            orders_pb2.CancelOrderRequest(id=self.fresh_order().id, reason="test")
        )
        return order


@pytest.fixture(scope="module")
def world(users: users_pb2_grpc.UserServiceStub, orders: orders_pb2_grpc.OrderServiceStub) -> World:
    owner, other = (
        users.CreateUser(users_pb2.CreateUserRequest(email=unique_email("sec"), name="Sec"))
        for _ in range(2)
    )
    order = orders.CreateOrder(orders_pb2.CreateOrderRequest(user_id=owner.id, amount=ONE_DOLLAR))
    return World(owner, other, order, orders)


@dataclass(frozen=True)
class Caller:
    identity: str  # whose certificate it presents
    authorization: Callable[[World], str | None]  # the `authorization` metadata it sends


def bearer(token: Callable[[World], str]) -> Callable[[World], str]:
    return lambda world: f"Bearer {token(world)}"


def client_with(token: Callable[[World], str]) -> Caller:
    return Caller("client", bearer(token))


def no_token(identity: str) -> Caller:
    return Caller(identity, lambda _world: None)


def admin_token(_world: World) -> str:
    return signed(claims())


CALLERS = {
    "no token": no_token("client"),
    "not bearer": Caller("client", lambda _world: "Basic dXNlcjpwYXNzd29yZA=="),
    "expired": client_with(lambda _w: signed(claims(exp=int(datetime.now(UTC).timestamp()) - 60))),
    "forged": client_with(lambda _w: forged(claims())),
    "alg none": client_with(lambda _w: unsigned(claims())),
    "hs256 pubkey": client_with(lambda _w: hmac_with_public_key(claims())),
    "wrong issuer": client_with(lambda _w: signed(claims(iss="https://auth.evil.example"))),
    "wrong audience": client_with(lambda _w: signed(claims(aud="another-system"))),
    "no exp": client_with(lambda _w: signed(claims(exp=None))),
    "no scope": client_with(lambda w: signed(claims(w.owner.id, scope=""))),
    "user": client_with(lambda w: signed(claims(w.owner.id, scope="user"))),
    "other user": client_with(lambda w: signed(claims(w.other.id, scope="user"))),
    "admin": client_with(admin_token),
    "processor": no_token("processor"),
    "processor+forged": Caller("processor", bearer(lambda _w: forged(claims()))),
    "processor+admin": Caller("processor", bearer(admin_token)),
    "order_service": no_token("order_service"),
    "order_service+admin": Caller("order_service", bearer(admin_token)),
    "user_service": no_token("user_service"),
    "user_service+admin": Caller("user_service", bearer(admin_token)),
}

# What each request asks for; the method is the first word.
REQUESTS: dict[str, Callable[[World], Message]] = {
    "CreateUser": lambda _w: users_pb2.CreateUserRequest(email=unique_email("sec"), name="Sec"),
    "GetUser": lambda w: users_pb2.GetUserRequest(id=w.owner.id),
    "ListUsers": lambda _w: users_pb2.ListUsersRequest(page_size=1),
    "CreateOrder": lambda w: orders_pb2.CreateOrderRequest(user_id=w.owner.id, amount=ONE_DOLLAR),
    "GetOrder": lambda w: orders_pb2.GetOrderRequest(id=w.order.id),
    "WatchOrder": lambda w: orders_pb2.WatchOrderRequest(id=w.cancelled_order().id),
    "CancelOrder": lambda w: orders_pb2.CancelOrderRequest(id=w.fresh_order().id),
    "ListOrders": lambda w: orders_pb2.ListOrdersRequest(user_id=w.owner.id, page_size=1),
    "ListOrders all": lambda _w: orders_pb2.ListOrdersRequest(page_size=1),  # no user_id
    "UpdateOrderStatus": lambda w: orders_pb2.UpdateOrderStatusRequest(
        id=w.fresh_order().id, status=orders_pb2.ORDER_STATUS_PROCESSED
    ),
    "BatchUpdateOrderStatus": lambda w: orders_pb2.BatchUpdateOrderStatusRequest(
        requests=[
            orders_pb2.UpdateOrderStatusRequest(
                id=w.fresh_order().id, status=orders_pb2.ORDER_STATUS_PROCESSED
            )
        ]
    ),
}


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    reason: str = ""  # the ErrorInfo reason


OK = Outcome(grpc.StatusCode.OK)
MISSING = Outcome(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")
MALFORMED = Outcome(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MALFORMED")
EXPIRED = Outcome(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")
INVALID = Outcome(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
NO_ADMIN = Outcome(grpc.StatusCode.PERMISSION_DENIED, "ADMIN_SCOPE_REQUIRED")
NOT_OWNER = Outcome(grpc.StatusCode.PERMISSION_DENIED, "NOT_RESOURCE_OWNER")
NO_SCOPE = Outcome(grpc.StatusCode.PERMISSION_DENIED, "SCOPE_REQUIRED")
WORKLOAD = Outcome(grpc.StatusCode.PERMISSION_DENIED, "WORKLOAD_NOT_ALLOWED")
NOT_FOUND = Outcome(grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND")

Matrix = dict[str, tuple[Outcome, ...]]  # caller -> the outcome of each request (a column)

# fmt: off
USER_SERVICE_COLUMNS = ("CreateUser", "GetUser", "ListUsers")
USER_SERVICE_MATRIX: Matrix = {
    "no token":            (MISSING,   MISSING,   MISSING),
    "not bearer":          (MALFORMED, MALFORMED, MALFORMED),
    "expired":             (EXPIRED,   EXPIRED,   EXPIRED),
    "forged":              (INVALID,   INVALID,   INVALID),
    "alg none":            (INVALID,   INVALID,   INVALID),
    "hs256 pubkey":        (INVALID,   INVALID,   INVALID),
    "wrong issuer":        (INVALID,   INVALID,   INVALID),
    "wrong audience":      (INVALID,   INVALID,   INVALID),
    "no exp":              (INVALID,   INVALID,   INVALID),
    "no scope":            (NO_ADMIN,  NO_SCOPE,  NO_ADMIN),
    "user":                (NO_ADMIN,  OK,        NO_ADMIN),
    "other user":          (NO_ADMIN,  NOT_OWNER, NO_ADMIN),
    "admin":               (OK,        OK,        OK),
    "processor":           (MISSING,   MISSING,   MISSING),
    "processor+forged":    (INVALID,   INVALID,   INVALID),
    "processor+admin":     (OK,        OK,        OK),
    "order_service":       (MISSING,   MISSING,   MISSING),
    "order_service+admin": (OK,        OK,        OK),
    "user_service":        (MISSING,   MISSING,   MISSING),
    "user_service+admin":  (OK,        OK,        OK),
}
ORDER_SERVICE_COLUMNS = (
    "CreateOrder", "GetOrder", "ListOrders", "ListOrders all",
    "UpdateOrderStatus", "BatchUpdateOrderStatus", "WatchOrder", "CancelOrder",
)
_UNARY_OUTCOMES: Matrix = {
    "no token":            (MISSING,   MISSING,   MISSING,   MISSING,   WORKLOAD,  WORKLOAD),
    "not bearer":          (MALFORMED, MALFORMED, MALFORMED, MALFORMED, MALFORMED, MALFORMED),
    "expired":             (EXPIRED,   EXPIRED,   EXPIRED,   EXPIRED,   EXPIRED,   EXPIRED),
    "forged":              (INVALID,   INVALID,   INVALID,   INVALID,   INVALID,   INVALID),
    "alg none":            (INVALID,   INVALID,   INVALID,   INVALID,   INVALID,   INVALID),
    "hs256 pubkey":        (INVALID,   INVALID,   INVALID,   INVALID,   INVALID,   INVALID),
    "wrong issuer":        (INVALID,   INVALID,   INVALID,   INVALID,   INVALID,   INVALID),
    "wrong audience":      (INVALID,   INVALID,   INVALID,   INVALID,   INVALID,   INVALID),
    "no exp":              (INVALID,   INVALID,   INVALID,   INVALID,   INVALID,   INVALID),
    "no scope":            (NO_SCOPE,  NO_SCOPE,  NO_SCOPE,  NO_SCOPE,  WORKLOAD,  WORKLOAD),
    "user":                (OK,        OK,        OK,        NO_ADMIN,  WORKLOAD,  WORKLOAD),
    "other user":          (NOT_OWNER, NOT_OWNER, NOT_OWNER, NO_ADMIN,  WORKLOAD,  WORKLOAD),
    "admin":               (OK,        OK,        OK,        OK,        WORKLOAD,  WORKLOAD),
    "processor":           (MISSING,   MISSING,   MISSING,   MISSING,   OK,        OK),
    "processor+forged":    (INVALID,   INVALID,   INVALID,   INVALID,   INVALID,   INVALID),
    "processor+admin":     (OK,        OK,        OK,        OK,        OK,        OK),
    "order_service":       (MISSING,   MISSING,   MISSING,   MISSING,   WORKLOAD,  WORKLOAD),
    "order_service+admin": (OK,        OK,        OK,        OK,        WORKLOAD,  WORKLOAD),
    "user_service":        (MISSING,   MISSING,   MISSING,   MISSING,   WORKLOAD,  WORKLOAD),
    "user_service+admin":  (OK,        OK,        OK,        OK,        WORKLOAD,  WORKLOAD),
}
# fmt: on
# WatchOrder and CancelOrder have GetOrder's rule: the order's owner, or an admin.
ORDER_SERVICE_MATRIX: Matrix = {
    caller: (*row, row[1], row[1]) for caller, row in _UNARY_OUTCOMES.items()
}

SERVICES: dict[str, tuple[tuple[str, ...], Matrix]] = {
    "UserService": (USER_SERVICE_COLUMNS, USER_SERVICE_MATRIX),
    "OrderService": (ORDER_SERVICE_COLUMNS, ORDER_SERVICE_MATRIX),
}
CASES = [
    pytest.param(service, request_name, caller, expected, id=f"{request_name}-{caller}")
    for service, (columns, matrix) in SERVICES.items()
    for caller, row in matrix.items()
    for request_name, expected in zip(columns, row, strict=True)
]


class Clients:
    """Channels to the servers, one per certificate, opened when first asked for."""

    def __init__(self, ports: dict[str, int]) -> None:
        self._ports = ports
        self._channels: dict[tuple[str, str], grpc.Channel] = {}

    def channel(self, service: str, identity: str) -> grpc.Channel:
        key = (service, identity)
        if key not in self._channels:
            address = f"localhost:{self._ports[service]}"
            self._channels[key] = credentials.channel(address, identity)
        return self._channels[key]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


@pytest.fixture(scope="module")
def clients(user_server: RunningService, order_server: RunningService) -> Iterator[Clients]:
    opened = Clients({"UserService": user_server.port, "OrderService": order_server.port})
    yield opened
    opened.close()


def outcome_of(method: Callable[..., Any], request: Message, authorization: str | None) -> Outcome:
    metadata = () if authorization is None else (("authorization", authorization),)

    def call(message: Message) -> Any:
        response = method(message, metadata=metadata, timeout=10)
        return list(response) if isinstance(response, Iterator) else response  # a stream

    try:
        call(request)
    except grpc.RpcError:
        failure = call_fails(call, request)
        return Outcome(failure.code, failure.reason)
    return OK


def stub_method(channel: grpc.Channel, service: str, method: str) -> Callable[..., Any]:
    stub: Any = (
        users_pb2_grpc.UserServiceStub(channel)
        if service == "UserService"
        else orders_pb2_grpc.OrderServiceStub(channel)
    )
    return getattr(stub, method)  # type: ignore[no-any-return]


def test_the_matrix_covers_every_method_and_caller() -> None:
    descriptors = {
        "UserService": users_pb2.DESCRIPTOR.services_by_name["UserService"],
        "OrderService": orders_pb2.DESCRIPTOR.services_by_name["OrderService"],
    }
    access = {"UserService": USER_ACCESS, "OrderService": ORDER_ACCESS}
    for service, (columns, matrix) in SERVICES.items():
        methods = set(descriptors[service].methods_by_name)
        assert {column.split()[0] for column in columns} == methods, service
        assert set(access[service]) == methods, f"{service}: a method without an access rule"
        assert set(matrix) == set(CALLERS), service


@pytest.mark.parametrize(("service", "request_name", "caller", "expected"), CASES)
def test_access(
    clients: Clients,
    world: World,
    service: str,
    request_name: str,
    caller: str,
    expected: Outcome,
) -> None:
    who = CALLERS[caller]
    method = stub_method(clients.channel(service, who.identity), service, request_name.split()[0])

    outcome = outcome_of(method, REQUESTS[request_name](world), who.authorization(world))

    assert outcome == expected


@pytest.mark.parametrize(
    ("caller", "expected"),
    [("user", NOT_OWNER), ("other user", NOT_OWNER), ("admin", NOT_FOUND)],
)
def test_a_missing_order_looks_like_a_foreign_one_to_a_user(
    clients: Clients, world: World, caller: str, expected: Outcome
) -> None:
    who = CALLERS[caller]
    method = stub_method(clients.channel("OrderService", who.identity), "OrderService", "GetOrder")
    request = orders_pb2.GetOrderRequest(id=str(uuid.uuid4()))

    assert outcome_of(method, request, who.authorization(world)) == expected


def status_changes_of(engine: Engine, order_id: str) -> tuple[str, int]:
    """The order's status column and how many status-change rows it has."""
    with engine.connect() as connection:
        status = connection.scalar(
            text("SELECT status FROM orders WHERE id = :id"), {"id": order_id}
        )
        changes = connection.scalar(
            text("SELECT count(*) FROM order_status_changes WHERE order_id = :id"),
            {"id": order_id},
        )
    return str(status), int(changes or 0)


# A caller that is not the processor is refused: for who it is, or for a bad token it sent.
REFUSED_CODES = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


def test_an_order_touched_by_a_non_processor_caller_stays_created(
    clients: Clients, world: World, engine: Engine
) -> None:
    order = world.fresh_order()
    processed = orders_pb2.UpdateOrderStatusRequest(
        id=order.id, status=orders_pb2.ORDER_STATUS_PROCESSED
    )
    failed = orders_pb2.UpdateOrderStatusRequest(id=order.id, status=orders_pb2.ORDER_STATUS_FAILED)
    changes = [
        ("UpdateOrderStatus", processed),
        ("UpdateOrderStatus", failed),
        ("BatchUpdateOrderStatus", orders_pb2.BatchUpdateOrderStatusRequest(requests=[processed])),
        ("BatchUpdateOrderStatus", orders_pb2.BatchUpdateOrderStatusRequest(requests=[failed])),
    ]
    outsiders = [name for name, caller in CALLERS.items() if caller.identity != "processor"]

    for caller in outsiders:
        who = CALLERS[caller]
        channel = clients.channel("OrderService", who.identity)
        for method_name, request in changes:
            method = stub_method(channel, "OrderService", method_name)
            refused = outcome_of(method, request, who.authorization(world))
            assert refused.code in REFUSED_CODES, caller

    assert world.admin_orders.GetOrder(orders_pb2.GetOrderRequest(id=order.id)) == order
    assert status_changes_of(engine, order.id) == ("CREATED", 0)


# --- Certificates of another CA ------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, and certificates it signed for the same identities (the processor too)."""
    directory = tmp_path_factory.mktemp("foreign-ca")
    subprocess.run(
        ["bash", str(REPO / "scripts/certs.sh")],
        env={
            **os.environ,
            "CERTS_DIR": str(directory / "certs"),
            "SECRETS_DIR": str(directory / "secrets"),
        },
        check=True,
        capture_output=True,
        timeout=60,
    )
    return directory / "certs"


@pytest.mark.parametrize(
    ("certificate_from", "trusting", "expected"),
    [
        ("our CA", "our CA", grpc.StatusCode.OK),  # the control: these channels can work
        ("another CA", "our CA", grpc.StatusCode.UNAVAILABLE),  # the server refuses the client
        ("our CA", "another CA", grpc.StatusCode.UNAVAILABLE),  # the client cannot verify it
        (None, "our CA", grpc.StatusCode.UNAVAILABLE),  # no client certificate at all
    ],
)
def test_only_certificates_of_our_ca_get_a_call_through(
    order_server: RunningService,
    world: World,
    foreign_certs: Path,
    engine: Engine,
    certificate_from: str | None,
    trusting: str,
    expected: grpc.StatusCode,
) -> None:
    directories = {"our CA": CERTS_DIR, "another CA": foreign_certs}
    key_and_chain = {}
    if certificate_from is not None:
        # A certificate naming the processor: if another CA signed it, it settles nothing.
        directory = directories[certificate_from]
        key_and_chain = {
            "private_key": (directory / "processor.key").read_bytes(),
            "certificate_chain": (directory / "processor.crt").read_bytes(),
        }
    channel_credentials = grpc.ssl_channel_credentials(
        root_certificates=(directories[trusting] / "ca.crt").read_bytes(), **key_and_chain
    )
    order = world.fresh_order()
    settle = orders_pb2.UpdateOrderStatusRequest(
        id=order.id, status=orders_pb2.ORDER_STATUS_PROCESSED
    )

    with grpc.secure_channel(f"localhost:{order_server.port}", channel_credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check
        settle_call = orders_pb2_grpc.OrderServiceStub(channel).UpdateOrderStatus
        outcomes = [
            outcome_of(health, health_pb2.HealthCheckRequest(), None).code,
            outcome_of(settle_call, settle, None).code,
        ]

    assert outcomes == [expected, expected]
    if expected is not grpc.StatusCode.OK:
        assert status_changes_of(engine, order.id) == ("CREATED", 0)


# --- Calls that send their headers and never their message --------------------------------------

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """An HTTP/2 frame (RFC 9113 section 4.1)."""
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def hpack_integer(value: int, prefix_bits: int) -> bytes:
    """RFC 7541 section 5.1."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    encoded = bytearray([limit])
    value -= limit
    while value >= 0x80:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def hpack_string(value: str) -> bytes:
    raw = value.encode()
    return hpack_integer(len(raw), 7) + raw  # the H bit clear: no Huffman coding


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """Each field as a literal without indexing, with a literal name (RFC 7541 section 6.2.2)."""
    return b"".join(b"\x00" + hpack_string(name) + hpack_string(value) for name, value in headers)


def grpc_message(message: Message) -> bytes:
    body = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body  # not compressed, length, message


class RawGrpcConnection:
    """A TLS connection that speaks just enough HTTP/2, by hand, to start gRPC calls and hold
    them open: their headers sent, their request message not."""

    MAX_FRAMES = 1000  # what one read may go through before it is called stuck

    def __init__(self, port: int) -> None:
        context = ssl.create_default_context(cafile=str(CERTS_DIR / "ca.crt"))
        context.load_cert_chain(CERTS_DIR / "client.crt", CERTS_DIR / "client.key")
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)  # every read bounded
        self._socket = context.wrap_socket(raw, server_hostname="localhost")
        assert self._socket.selected_alpn_protocol() == "h2"
        self._socket.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self._next_stream = 1
        self.received: dict[int, bytes] = {}  # stream -> the DATA it got
        self.ended: set[int] = set()  # streams the server ended (trailers sent)

    def start_call(self, path: str, authorization: str) -> int:
        stream = self._next_stream
        self._next_stream += 2
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("authorization", authorization),
        ]
        self._socket.sendall(frame(HEADERS, END_HEADERS, stream, header_block(headers)))
        return stream

    def send_message(self, stream: int, message: Message) -> None:
        self._socket.sendall(frame(DATA, END_STREAM, stream, grpc_message(message)))

    def sync(self) -> None:
        """Returns once the server has read every frame sent so far (it answers pings in order)."""
        opaque = os.urandom(8)
        self._socket.sendall(frame(PING, 0, 0, opaque))
        self._read_until(
            lambda kind, flags, payload: kind == PING and flags & ACK and payload == opaque
        )

    def wait_until_ended(self, streams: list[int]) -> None:
        self._read_until(lambda *_frame: self.ended.issuperset(streams))

    def _read_until(self, done: Callable[[int, int, bytes], object]) -> None:
        for _ in range(self.MAX_FRAMES):
            kind, flags, stream, payload = self._read_frame()
            assert kind not in (RST_STREAM, GOAWAY), (kind, stream, payload)
            if kind in (SETTINGS, PING) and not flags & ACK:
                self._socket.sendall(frame(kind, ACK, 0, payload if kind == PING else b""))
            elif kind == DATA:
                self.received[stream] = self.received.get(stream, b"") + payload
            elif kind == HEADERS and flags & END_STREAM:
                self.ended.add(stream)
            if done(kind, flags, payload):
                return
        raise AssertionError(f"no end after {self.MAX_FRAMES} frames")

    def _read_frame(self) -> tuple[int, int, int, bytes]:
        head = self._read_exactly(9)
        payload = self._read_exactly(int.from_bytes(head[:3], "big"))
        return head[3], head[4], int.from_bytes(head[5:], "big") & 0x7FFFFFFF, payload

    def _read_exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = self._socket.recv(count - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        self._socket.close()


def test_calls_that_never_send_their_message_hold_no_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    workers = 4
    running = start_service(
        USER_SERVICE, service_settings("user_service", GRPC_MAX_WORKERS=str(workers))
    )
    connections: list[RawGrpcConnection] = []
    path = f"/{USER_SERVICE.full_name}/GetUser"
    try:
        address = f"localhost:{running.port}"
        with credentials.admin_channel(address) as channel:
            users = users_pb2_grpc.UserServiceStub(channel)
            user = users.CreateUser(users_pb2.CreateUserRequest(email=unique_email(), name="H2"))
            caplog.set_level(logging.INFO, logger="servicekit")
            authorization = f"Bearer {credentials.token()}"
            held: dict[RawGrpcConnection, list[int]] = {}
            for _ in range(8):  # 8 connections of 5 calls: 10 calls per worker
                connection = RawGrpcConnection(running.port)
                connections.append(connection)
                held[connection] = [connection.start_call(path, authorization) for _ in range(5)]
                connection.sync()  # the server has the calls' headers
            assert sum(len(streams) for streams in held.values()) == 10 * workers

            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert users.GetUser(users_pb2.GetUserRequest(id=user.id), timeout=1) == user

            # The held calls were real, and still open: given their message, each completes.
            for connection, streams in held.items():
                for stream in streams:
                    connection.send_message(stream, users_pb2.GetUserRequest(id=user.id))
                connection.wait_until_ended(streams)
                for stream in streams:
                    body = connection.received.get(stream, b"")
                    assert users_pb2.User.FromString(body[5:]) == user, stream
    finally:
        for connection in connections:
            connection.close()
        running.stop(grace_seconds=1)

    rpc_lines = [getattr(r, "fields", {}) for r in caplog.records if r.name == "servicekit.rpc"]
    assert [line.get("code") for line in rpc_lines if line.get("method") == path] == ["OK"] * 41
    complaints = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith(("servicekit.rpc", "grpc"))
    ]
    assert not complaints, caplog.text


# --- Kafka: who may write and read the orders topic ----------------------------------------------


def kafka_settings(identity: str) -> KafkaSettings:
    return KafkaSettings.from_env(TEST_ENV, tls_of(identity))


def harmless_order_event() -> tuple[bytes, Headers]:
    """An OrderStatusChanged of an order that does not exist: what the order service writes, and
    what the processor skips, so that other tests reading the topic are not disturbed."""
    event = events_pb2.OrderStatusChanged(
        event_id=str(uuid.uuid4()),
        order_id=str(uuid.uuid4()),
        user_id=str(uuid.uuid4()),
        old_status=orders_pb2.ORDER_STATUS_CREATED,
        new_status=orders_pb2.ORDER_STATUS_PROCESSED,
    )
    event.occur_time.GetCurrentTime()
    headers = cloudevent_headers(
        event.event_id,
        event_source("order_service"),
        events_pb2.OrderStatusChanged.DESCRIPTOR.full_name,
        event.occur_time.ToDatetime(UTC),
    )
    return event.SerializeToString(), headers


@pytest.mark.parametrize(
    ("identity", "refusal"),
    [
        ("order_service", None),  # the topic's writer
        ("dlq_replay", None),  # puts dead letters back
        ("user_service", "TOPIC_AUTHORIZATION_FAILED"),
        ("processor", "TOPIC_AUTHORIZATION_FAILED"),
        ("client", "TOPIC_AUTHORIZATION_FAILED"),
    ],
)
def test_only_its_writers_may_write_the_orders_topic(
    kafka_topics: KafkaSettings, identity: str, refusal: str | None
) -> None:
    settings = kafka_settings(identity)
    producer = Producer(
        producer_config(settings, f"test-security-{identity}", **{"message.timeout.ms": 8000})
    )
    reports: list[KafkaError | None] = []
    value, headers = harmless_order_event()

    producer.produce(
        settings.orders_topic,
        key=str(uuid.uuid4()).encode(),
        value=value,
        headers=headers,
        on_delivery=lambda error, _message: reports.append(error),
    )

    assert producer.flush(10) == 0
    assert [None if error is None else error.name() for error in reports] == [refusal]


AUTHORIZATION_FAILURES = {"TOPIC_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED"}


def read_attempt(settings: KafkaSettings) -> tuple[bool, set[str]]:
    """Whether a consumer of `settings`' identity got a record or reached the end of a partition
    of the orders topic (both need a successful fetch), and the errors it was told of."""
    consumer = Consumer(
        settings.client_config(
            **{
                "group.id": PROCESSOR_GROUP,  # assigned, not subscribed: it never joins the group
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
    )
    errors: set[str] = set()
    try:
        consumer.assign(
            [
                TopicPartition(settings.orders_topic, partition, OFFSET_BEGINNING)
                for partition in range(settings.topic_partitions)
            ]
        )
        polls_left = 20  # half a second each
        while polls_left > 0:
            polls_left -= 1
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is None or error.code() == KafkaError._PARTITION_EOF:
                return True, errors
            errors.add(error.name())
            polls_left = min(polls_left, 2)  # refused: a second more, in case a fetch follows
        return False, errors
    finally:
        consumer.close()


@pytest.mark.parametrize(
    ("identity", "sees_the_topic", "reads"),
    [
        ("processor", True, True),
        ("client", False, False),
        ("order_service", True, True),  # its writer, and WatchOrder's feed reads it
        ("user_service", False, False),
    ],
)
def test_only_the_processor_and_order_service_read_the_orders_topic(
    kafka_topics: KafkaSettings, identity: str, sees_the_topic: bool, reads: bool
) -> None:
    settings = kafka_settings(identity)
    producer = Producer(settings.client_config())  # only asks for the topic's metadata
    topic = producer.list_topics(settings.orders_topic, timeout=10).topics[settings.orders_topic]
    assert (topic.error is None) is sees_the_topic, topic.error

    read, errors = read_attempt(settings)

    assert read is reads, errors
    assert errors <= AUTHORIZATION_FAILURES
    if reads:
        # order_service reads outside the processor's group: it is told so, and reads all the same.
        assert errors <= {"GROUP_AUTHORIZATION_FAILED"}, errors
    else:
        assert errors, "refused without a reason"


# --- The processor's server, and token claims the verifier bounds -------------------------------


def test_the_processor_accepts_only_order_service_as_its_server(
    user_server: RunningService, order_server: RunningService
) -> None:
    """user_service's certificate is signed by the same CA but does not name order_service."""

    def health_through(port: int) -> health_pb2.HealthCheckResponse:
        address = f"127.0.0.1:{port}"
        with open_channel(address, tls_of("processor"), server_identity="order_service") as ch:
            reply: health_pb2.HealthCheckResponse = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            return reply

    assert health_through(order_server.port).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as refused:
        health_through(user_server.port)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_the_verifier_bounds_lifetime_and_subject_and_allows_clock_skew() -> None:
    verifier = TokenVerifier(AUTH)
    now = int(time.time())
    too_long = signed(claims("ops", exp=now + int(AUTH.max_lifetime_seconds) + 60))
    empty_subject = signed(claims(""))
    for refused in (too_long, empty_subject):
        with pytest.raises(Unauthenticated) as error:
            verifier.verify(f"Bearer {refused}")
        assert error.value.reason == "TOKEN_INVALID"
    # An issuer whose clock is a few seconds ahead: its fresh tokens are accepted.
    ahead = signed(claims("ops", iat=now + 5))
    assert verifier.verify(f"Bearer {ahead}").subject == "ops"
