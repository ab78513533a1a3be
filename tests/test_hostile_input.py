"""Property-based tests: random and hostile field values on every RPC always get a proper status
(never UNKNOWN or INTERNAL), a message naming the field, and change nothing when rejected.

HYPOTHESIS_PROFILE=full runs 300 cases per RPC (2,100 in all); the default CI profile, 60. The
bearer-token tests at the end run a quarter of that each: 75, or 15.
"""

from __future__ import annotations

import base64
import json
import os
import string
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc
from google.type import money_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from servicekit import local_credentials as credentials
from servicekit.local_credentials import admin_channel
from servicekit.server import RunningService
from servicekit.tokens import ALGORITHM
from tests.conftest import RelayHandle
from tests.rpc_errors import RpcFailure, call_fails, failure_of

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "full",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Statuses a well-formed server may answer bad input with; UNKNOWN and INTERNAL mean a bug.
EXPECTED_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)

# Any valid UTF-8 (protobuf strings cannot carry lone surrogates), NUL and controls included.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)
huge_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1000, max_size=20_000)
edge_text = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\u202e",
        "\ufeff",
        "\U0001f4a9" * 50,
        "é",
        "e\u0301",
        "\u0000" * 10,
    ]
)
with_nul = st.tuples(any_text, any_text).map("\x00".join)
texts = st.one_of(any_text, huge_text, edge_text, with_nul)
uuids = st.uuids().map(str)
ids = st.one_of(uuids, texts, uuids.map(str.upper), uuids.map(lambda u: u[:-1]))
emails = st.one_of(
    texts,
    st.emails().map(str),
    st.tuples(any_text, any_text).map(lambda parts: f"{parts[0]}@{parts[1]}.com"),
)
request_ids = st.one_of(st.just(""), uuids, texts)
page_tokens = st.one_of(
    st.just(""),
    texts,
    st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    # Nested JSON, deeper than the parser's recursion limit at the top end.
    st.integers(1, 100_000).map(lambda depth: base64.urlsafe_b64encode(b"[" * depth).decode()),
)
currency_codes = st.one_of(st.sampled_from(["USD", "EUR", "JPY", "usd", "", "US", "EURO"]), texts)
amounts = st.one_of(
    st.none(),
    st.builds(money_pb2.Money, currency_code=currency_codes, units=INT64, nanos=INT32),
)

Counts = dict[str, int]
TABLES = ("users", "orders", "order_status_changes", "outbox_events")


@pytest.fixture(scope="module", autouse=True)
def outbox_kept(relay: RelayHandle) -> Iterator[None]:
    """The relays delete what they publish: while they are stopped, the outbox counts every event
    written."""
    relay.stop()
    yield
    relay.start()


def row_counts(engine: Engine) -> Counts:
    with engine.connect() as connection:
        return {t: int(connection.scalar(text(f"SELECT count(*) FROM {t}")) or 0) for t in TABLES}


def assert_proper_failure_or_success(
    call: Callable[..., Any], request: Any, engine: Engine
) -> RpcFailure | None:
    before = row_counts(engine)
    try:
        call(request, timeout=10)
        return None
    except grpc.RpcError:
        pass
    failure = call_fails(call, request)
    assert failure.code in EXPECTED_CODES, (failure, request)
    assert failure.message, failure
    if failure.code is grpc.StatusCode.INVALID_ARGUMENT:
        assert failure.field_violations, failure
        assert all(field in failure.message for field in failure.field_violations), failure
    assert row_counts(engine) == before, "a rejected request wrote something"
    return failure


@pytest.fixture(scope="module")
def existing_order(
    users: users_pb2_grpc.UserServiceStub, orders: orders_pb2_grpc.OrderServiceStub
) -> orders_pb2.Order:
    user = users.CreateUser(
        users_pb2.CreateUserRequest(email=f"fuzz.{uuid.uuid4().hex[:10]}@example.com", name="Fuzz")
    )
    order: orders_pb2.Order = orders.CreateOrder(
        orders_pb2.CreateOrderRequest(
            user_id=user.id, amount=money_pb2.Money(currency_code="USD", units=1)
        )
    )
    return order


@given(email=emails, name=texts, request_id=request_ids)
def test_create_user(
    users: users_pb2_grpc.UserServiceStub, engine: Engine, email: str, name: str, request_id: str
) -> None:
    request = users_pb2.CreateUserRequest(email=email, name=name, request_id=request_id)
    assert_proper_failure_or_success(users.CreateUser, request, engine)


@given(user_id=ids)
def test_get_user(users: users_pb2_grpc.UserServiceStub, engine: Engine, user_id: str) -> None:
    assert_proper_failure_or_success(users.GetUser, users_pb2.GetUserRequest(id=user_id), engine)


@given(page_size=INT32, page_token=page_tokens)
def test_list_users(
    users: users_pb2_grpc.UserServiceStub, engine: Engine, page_size: int, page_token: str
) -> None:
    request = users_pb2.ListUsersRequest(page_size=page_size, page_token=page_token)
    assert_proper_failure_or_success(users.ListUsers, request, engine)


@given(user_id=st.one_of(ids, st.just("existing")), amount=amounts, request_id=request_ids)
def test_create_order(
    orders: orders_pb2_grpc.OrderServiceStub,
    existing_order: orders_pb2.Order,
    engine: Engine,
    user_id: str,
    amount: money_pb2.Money | None,
    request_id: str,
) -> None:
    user_id = existing_order.user_id if user_id == "existing" else user_id
    request = orders_pb2.CreateOrderRequest(user_id=user_id, amount=amount, request_id=request_id)
    assert_proper_failure_or_success(orders.CreateOrder, request, engine)


@given(order_id=ids)
def test_get_order(orders: orders_pb2_grpc.OrderServiceStub, engine: Engine, order_id: str) -> None:
    request = orders_pb2.GetOrderRequest(id=order_id)
    assert_proper_failure_or_success(orders.GetOrder, request, engine)


@given(user_id=st.one_of(st.just(""), ids), page_size=INT32, page_token=page_tokens)
def test_list_orders(
    orders: orders_pb2_grpc.OrderServiceStub,
    engine: Engine,
    user_id: str,
    page_size: int,
    page_token: str,
) -> None:
    request = orders_pb2.ListOrdersRequest(
        user_id=user_id, page_size=page_size, page_token=page_token
    )
    assert_proper_failure_or_success(orders.ListOrders, request, engine)


statuses = st.one_of(st.sampled_from([1, 2, 3]), INT32)


@given(status=statuses, reason=texts, unknown_order=st.booleans(), order_id=ids)
def test_update_order_status(
    orders: orders_pb2_grpc.OrderServiceStub,
    existing_order: orders_pb2.Order,
    engine: Engine,
    status: int,
    reason: str,
    unknown_order: bool,
    order_id: str,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    # A fresh order each time, so that allowed transitions are tried, not only terminal ones.
    target = orders.CreateOrder(
        orders_pb2.CreateOrderRequest(user_id=existing_order.user_id, amount=existing_order.amount)
    )
    request = orders_pb2.UpdateOrderStatusRequest(
        id=order_id if unknown_order else target.id,
        status=status,  # type: ignore[arg-type]  # unknown enum numbers on purpose
        reason=reason,
    )
    failure = assert_proper_failure_or_success(settlements.UpdateOrderStatus, request, engine)
    if failure is not None:
        assert orders.GetOrder(orders_pb2.GetOrderRequest(id=target.id)) == target


def is_shown_as_itself(text: str) -> bool:
    """No control, format (but the joiners), surrogate or private-use character."""
    hidden = {"Cc", "Cf", "Cs", "Co"}
    return all(unicodedata.category(c) not in hidden or c in "\u200c\u200d" for c in text)


@given(name=texts)
def test_accepted_names_are_shown_as_themselves_and_in_nfc(
    users: users_pb2_grpc.UserServiceStub, name: str
) -> None:
    request = users_pb2.CreateUserRequest(email=f"u.{uuid.uuid4().hex}@example.com", name=name)
    try:
        created = users.CreateUser(request, timeout=10)
    except grpc.RpcError as error:
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
        return
    assert is_shown_as_itself(created.name)
    assert unicodedata.is_normalized("NFC", created.name)


batch_items = st.builds(
    orders_pb2.UpdateOrderStatusRequest,
    id=ids,
    status=statuses,
    reason=st.one_of(st.just(""), texts),
)


@given(items=st.lists(batch_items, max_size=30), fresh=st.integers(0, 5))
def test_batch_update_order_status(
    orders: orders_pb2_grpc.OrderServiceStub,
    existing_order: orders_pb2.Order,
    engine: Engine,
    items: list[orders_pb2.UpdateOrderStatusRequest],
    fresh: int,
    settlements: orders_pb2_grpc.OrderServiceStub,
) -> None:
    created = [
        orders.CreateOrder(
            orders_pb2.CreateOrderRequest(
                user_id=existing_order.user_id, amount=existing_order.amount
            )
        )
        for _ in range(fresh)
    ]
    processed = orders_pb2.ORDER_STATUS_PROCESSED
    changes = [
        *items,
        *(orders_pb2.UpdateOrderStatusRequest(id=o.id, status=processed) for o in created),
    ]
    request = orders_pb2.BatchUpdateOrderStatusRequest(requests=changes)
    try:
        response = settlements.BatchUpdateOrderStatus(request, timeout=10)
    except grpc.RpcError:
        failure = call_fails(settlements.BatchUpdateOrderStatus, request)
        assert failure.code is grpc.StatusCode.INVALID_ARGUMENT and not changes, failure
        return
    assert len(response.results) == len(changes)
    for result in response.results:
        if result.HasField("error"):
            assert failure_of(result.error).code in EXPECTED_CODES, result.error


# --- Bearer tokens: whatever a client puts in `authorization` -------------------------------------

TOKEN_REFUSALS = {"TOKEN_MISSING", "TOKEN_MALFORMED", "TOKEN_EXPIRED", "TOKEN_INVALID"}
TOKEN_CASES = max(1, settings().max_examples // 4)
# gRPC metadata values are printable ASCII (the client itself refuses anything else).
metadata_characters = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
metadata_text = st.text(metadata_characters, max_size=300)
BASE64URL = string.ascii_letters + string.digits + "-_"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
CLAIM_NAMES = ("iss", "aud", "sub", "scope", "iat", "exp", "nbf", "jti")
jwt_headers = st.one_of(
    st.fixed_dictionaries(
        {"alg": st.sampled_from([ALGORITHM, "none", "None", "HS256", "RS256", "ES256", ""])},
        optional={"typ": st.just("JWT"), "kid": json_values, "crit": json_values},
    ),
    json_values,
)
jwt_payloads = st.dictionaries(st.sampled_from(CLAIM_NAMES) | st.text(max_size=8), json_values)


def jwt_shaped(parts: tuple[Any, Any, bytes]) -> str:
    """A compact JWT of any header and claims, with a random signature."""
    header, payload, signature = parts
    return ".".join(
        [
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(payload).encode()),
            b64url(signature),
        ]
    )


authorization_values = st.one_of(
    metadata_text,
    metadata_text.map("Bearer {}".format),
    st.lists(st.binary(max_size=120).map(b64url), min_size=1, max_size=4).map(
        lambda segments: "Bearer " + ".".join(segments)
    ),
    st.tuples(jwt_headers, jwt_payloads, st.binary(max_size=96))
    .map(jwt_shaped)
    .map("Bearer {}".format),
    st.integers(4000, 6000).map(lambda length: "Bearer " + "A" * length),  # past the size limit
)


@pytest.fixture(scope="module")
def orders_without_token(
    order_server: RunningService,
) -> Iterator[orders_pb2_grpc.OrderServiceStub]:
    """OrderService through a client certificate only: each call brings its own authorization."""
    with credentials.channel(f"localhost:{order_server.port}") as client_channel:
        yield orders_pb2_grpc.OrderServiceStub(client_channel)


@pytest.fixture(scope="module")
def valid_token() -> str:
    return credentials.token()


def get_order_as(
    stub: orders_pb2_grpc.OrderServiceStub, order: orders_pb2.Order, authorization: str
) -> RpcFailure | None:
    """GetOrder with this `authorization` metadata: None when it answers the order."""

    def call(request: orders_pb2.GetOrderRequest) -> orders_pb2.Order:
        found: orders_pb2.Order = stub.GetOrder(
            request, metadata=(("authorization", authorization),), timeout=10
        )
        return found

    request = orders_pb2.GetOrderRequest(id=order.id)
    try:
        found = call(request)
    except grpc.RpcError:
        return call_fails(call, request)
    assert found == order
    return None


def assert_refused_as_unauthenticated(failure: RpcFailure | None, authorization: str) -> None:
    assert failure is not None, f"accepted: {authorization!r}"
    assert failure.code is grpc.StatusCode.UNAUTHENTICATED, (failure, authorization)
    assert failure.reason in TOKEN_REFUSALS, (failure, authorization)


@settings(max_examples=TOKEN_CASES)
@given(authorization=authorization_values)
def test_any_authorization_but_a_valid_token_is_unauthenticated(
    orders_without_token: orders_pb2_grpc.OrderServiceStub,
    existing_order: orders_pb2.Order,
    valid_token: str,
    authorization: str,
) -> None:
    failure = get_order_as(orders_without_token, existing_order, authorization)

    assert_refused_as_unauthenticated(failure, authorization)
    assert get_order_as(orders_without_token, existing_order, f"Bearer {valid_token}") is None


@settings(max_examples=TOKEN_CASES)
@given(
    segment=st.sampled_from(["header", "payload", "signature"]),
    position=st.integers(0, 10_000),
    replacement=st.sampled_from(BASE64URL) | metadata_characters,
)
def test_a_token_with_one_character_changed_is_unauthenticated(
    orders_without_token: orders_pb2_grpc.OrderServiceStub,
    existing_order: orders_pb2.Order,
    valid_token: str,
    segment: str,
    position: int,
    replacement: str,
) -> None:
    segments = dict(zip(["header", "payload", "signature"], valid_token.split("."), strict=True))
    changed = segments[segment]
    at = position % len(changed)
    assume(changed[at] != replacement)
    segments[segment] = changed[:at] + replacement + changed[at + 1 :]
    authorization = f"Bearer {'.'.join(segments.values())}"

    failure = get_order_as(orders_without_token, existing_order, authorization)

    assert_refused_as_unauthenticated(failure, authorization)
    assert get_order_as(orders_without_token, existing_order, f"Bearer {valid_token}") is None


def signed_as_is(payload: dict[str, Any]) -> str:
    """Signed with the real key, by hand: PyJWT would refuse to encode some of these claims."""
    key = load_pem_private_key((credentials.CERTS_DIR / "token-signing.key").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    header = b64url(json.dumps({"alg": ALGORITHM, "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"


# Refusals of a verified token whose claims do not let it read this order.
CLAIM_REFUSALS = {(grpc.StatusCode.UNAUTHENTICATED, reason) for reason in TOKEN_REFUSALS} | {
    (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_REQUIRED"),
    (grpc.StatusCode.PERMISSION_DENIED, "NOT_RESOURCE_OWNER"),
}


@settings(max_examples=TOKEN_CASES)
@given(
    changes=st.dictionaries(st.sampled_from(CLAIM_NAMES), json_values, max_size=4),
    dropped=st.sets(st.sampled_from(CLAIM_NAMES), max_size=2),
)
def test_signed_tokens_with_hostile_claims_get_a_proper_status(
    orders_without_token: orders_pb2_grpc.OrderServiceStub,
    existing_order: orders_pb2.Order,
    valid_token: str,
    changes: dict[str, Any],
    dropped: set[str],
) -> None:
    """Even the signing key's holder cannot make the verifier fail with an internal error."""
    claims = {**jwt.decode(valid_token, options={"verify_signature": False}), **changes}
    payload = {name: value for name, value in claims.items() if name not in dropped}
    signed = signed_as_is(payload)

    failure = get_order_as(orders_without_token, existing_order, f"Bearer {signed}")

    if failure is not None:
        assert (failure.code, failure.reason) in CLAIM_REFUSALS, (failure, payload)


def test_servers_are_still_healthy(
    user_server: RunningService, order_server: RunningService
) -> None:
    for server in (user_server, order_server):
        with admin_channel(f"127.0.0.1:{server.port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
