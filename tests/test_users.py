"""UserService over gRPC, against the real database."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from ecommerce.v1 import users_pb2, users_pb2_grpc
from sqlalchemy import Engine, func, select

from dbschema.tables import UserRecord
from tests.conftest import unique_email
from tests.rpc_errors import call_fails


def create(stub: users_pb2_grpc.UserServiceStub, **fields: str) -> users_pb2.User:
    user: users_pb2.User = stub.CreateUser(users_pb2.CreateUserRequest(**fields))
    return user


def count_users(engine: Engine, **where: object) -> int:
    query = select(func.count()).select_from(UserRecord).filter_by(**where)
    with engine.connect() as connection:
        return int(connection.scalar(query) or 0)


def test_create_user_normalises_email_and_stores_it(
    users: users_pb2_grpc.UserServiceStub,
) -> None:
    local = f"Jane.Doe+{uuid.uuid4().hex[:8]}"
    user = create(users, email=f"  {local}@Example.COM ", name="  Jane Doe ")

    assert uuid.UUID(user.id)
    assert user.email == f"{local}@example.com"
    assert user.name == "Jane Doe"
    assert user.create_time.seconds > 0
    assert users.GetUser(users_pb2.GetUserRequest(id=user.id)) == user


def test_duplicate_email_is_already_exists_and_writes_nothing(
    users: users_pb2_grpc.UserServiceStub, engine: Engine
) -> None:
    local = f"dup.{uuid.uuid4().hex[:12]}"
    create(users, email=f"{local}@example.com", name="First")

    failure = call_fails(
        users.CreateUser, users_pb2.CreateUserRequest(email=f"{local}@EXAMPLE.com", name="Second")
    )

    assert failure.code is grpc.StatusCode.ALREADY_EXISTS
    assert failure.reason == "EMAIL_ALREADY_REGISTERED"
    assert count_users(engine, email=f"{local}@example.com") == 1


@pytest.mark.parametrize(
    ("email", "name", "field"),
    [
        ("", "Jane", "email"),
        ("   ", "Jane", "email"),
        ("no-at-sign.example.com", "Jane", "email"),
        ("jane@localhost", "Jane", "email"),
        ("jane@exa mple.com", "Jane", "email"),
        ("ja..ne@example.com", "Jane", "email"),
        ("jane@example.com\x00", "Jane", "email"),
        ("j" * 65 + "@example.com", "Jane", "email"),
        ("jane@" + "a" * 250 + ".com", "Jane", "email"),
        ("valid@example.com", "", "name"),
        ("valid@example.com", "   ", "name"),
        ("valid@example.com", "x" * 201, "name"),
        ("valid@example.com", "Jane\x00Doe", "name"),
    ],
)
def test_invalid_fields_are_invalid_argument_naming_the_field(
    users: users_pb2_grpc.UserServiceStub, engine: Engine, email: str, name: str, field: str
) -> None:
    before = count_users(engine)

    failure = call_fails(users.CreateUser, users_pb2.CreateUserRequest(email=email, name=name))

    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.field_violations) == [field]
    assert failure.message.startswith(f"{field}:")
    assert count_users(engine) == before


def test_malformed_request_id_is_invalid_argument(users: users_pb2_grpc.UserServiceStub) -> None:
    failure = call_fails(
        users.CreateUser,
        users_pb2.CreateUserRequest(email=unique_email(), name="Jane", request_id="retry-1"),
    )
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.field_violations) == ["request_id"]


def test_retry_with_same_request_id_returns_the_first_user(
    users: users_pb2_grpc.UserServiceStub, engine: Engine
) -> None:
    request_id = str(uuid.uuid4())
    fields = {"email": unique_email(), "name": "Retry", "request_id": request_id}

    first = create(users, **fields)
    second = create(users, **fields)

    assert second == first
    assert count_users(engine, request_id=uuid.UUID(request_id)) == 1


def test_request_id_reused_for_other_fields_is_refused(
    users: users_pb2_grpc.UserServiceStub, engine: Engine
) -> None:
    request_id = str(uuid.uuid4())
    create(users, email=unique_email(), name="First", request_id=request_id)
    other_email = unique_email()

    failure = call_fails(
        users.CreateUser,
        users_pb2.CreateUserRequest(email=other_email, name="Other", request_id=request_id),
    )

    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "REQUEST_ID_REUSED"
    assert count_users(engine, email=other_email) == 0


def test_concurrent_retries_create_one_user(
    users: users_pb2_grpc.UserServiceStub, engine: Engine
) -> None:
    request = users_pb2.CreateUserRequest(
        email=unique_email("race"), name="Race", request_id=str(uuid.uuid4())
    )
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda _: users.CreateUser(request), range(12)))

    assert len({user.id for user in results}) == 1
    assert count_users(engine, request_id=uuid.UUID(request.request_id)) == 1


def test_get_unknown_user_is_not_found(users: users_pb2_grpc.UserServiceStub) -> None:
    missing = str(uuid.uuid4())
    failure = call_fails(users.GetUser, users_pb2.GetUserRequest(id=missing))
    assert failure.code is grpc.StatusCode.NOT_FOUND
    assert failure.reason == "USER_NOT_FOUND"
    assert missing in failure.message


@pytest.mark.parametrize("bad_id", ["", "42", "not-a-uuid", "' OR 1=1 --"])
def test_get_malformed_id_is_invalid_argument(
    users: users_pb2_grpc.UserServiceStub, bad_id: str
) -> None:
    failure = call_fails(users.GetUser, users_pb2.GetUserRequest(id=bad_id))
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.field_violations) == ["id"]


def test_list_users_pages_through_everything_once_despite_inserts(
    users: users_pb2_grpc.UserServiceStub,
) -> None:
    mine = [create(users, email=unique_email("page"), name="Pager").id for _ in range(7)]
    late: list[str] = []
    seen: list[str] = []
    token = ""
    for _ in range(10_000):  # bounded: the table holds what earlier tests of this run created
        page = users.ListUsers(users_pb2.ListUsersRequest(page_size=3, page_token=token))
        assert len(page.users) <= 3
        seen.extend(user.id for user in page.users)
        token = page.next_page_token
        if not token:
            break
        # Rows inserted between pages sort after the cursor: they never shift or repeat a page.
        if len(late) < 5:
            late.append(create(users, email=unique_email("late"), name="Late").id)

    assert not token
    assert len(seen) == len(set(seen))
    assert [user_id for user_id in seen if user_id in mine] == mine
    assert seen[-len(late) :] == late


def test_list_users_page_size_rules(users: users_pb2_grpc.UserServiceStub) -> None:
    for _ in range(2):
        create(users, email=unique_email("size"), name="Size")

    default = users.ListUsers(users_pb2.ListUsersRequest(page_size=0))
    assert 2 <= len(default.users) <= 50
    huge = users.ListUsers(users_pb2.ListUsersRequest(page_size=2_000_000_000))
    assert len(huge.users) <= 1000

    failure = call_fails(users.ListUsers, users_pb2.ListUsersRequest(page_size=-1))
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.field_violations) == ["page_size"]


@pytest.mark.parametrize("token", ["garbage", "eyJ2IjoxfQ", "%%%", "x" * 5000])
def test_list_users_forged_token_is_invalid_argument(
    users: users_pb2_grpc.UserServiceStub, token: str
) -> None:
    failure = call_fails(users.ListUsers, users_pb2.ListUsersRequest(page_token=token))
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.field_violations) == ["page_token"]
