"""UserService's domain logic."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import NamedTuple

import grpc
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import users_pb2, users_pb2_grpc
from psycopg2 import IntegrityError

from servicekit.access import AccessTable, Admin, ForUser
from servicekit.call_scope import annotate_log
from servicekit.db import violated_constraint
from servicekit.errors import AlreadyExists, NotFound
from servicekit.fields import parse_id, parse_request_id, to_timestamp
from servicekit.idempotency import Creation, create_once
from servicekit.jsonlog import mask_email
from servicekit.outbox import StagedEvent, new_event_id
from servicekit.pagination import ListQuery, fetch_page
from servicekit.server import ServiceDefinition, ServiceResources
from servicekit.sql import Statement
from user_service.validation import normalise_email, normalise_name


class UserRow(NamedTuple):
    """A `users` row, as the statements below select it."""

    id: uuid.UUID
    email: str
    name: str
    create_time: datetime


USER_COLUMNS = ", ".join(UserRow._fields)
SELECT_USER = Statement(f"SELECT {USER_COLUMNS} FROM users WHERE id = %(id)s::uuid")


def user_message(row: UserRow) -> users_pb2.User:
    return users_pb2.User(
        id=str(row.id), email=row.email, name=row.name, create_time=to_timestamp(row.create_time)
    )


class UserServicer(users_pb2_grpc.UserServiceServicer):
    def __init__(self, resources: ServiceResources) -> None:
        self._database = resources.database
        self._users_topic = resources.settings.kafka.users_topic
        self._event_source = resources.event_source

    def CreateUser(
        self, request: users_pb2.CreateUserRequest, context: grpc.ServicerContext
    ) -> users_pb2.User:
        email = normalise_email(request.email)
        name = normalise_name(request.name)
        request_id = parse_request_id(request.request_id)
        new_user = UserRow(uuid.uuid4(), email, name, datetime.now(UTC))
        user = user_message(new_user)
        created = events_pb2.UserCreated(
            event_id=new_event_id(), user=user, occur_time=user.create_time
        )
        creation = Creation(
            table="users",
            new_row=new_user,
            request_id=request_id,
            event=StagedEvent(
                self._users_topic, key=user.id, source=self._event_source, event=created
            ),
            same_request=lambda earlier: (earlier.email, earlier.name) == (email, name),
        )
        try:
            row = create_once(self._database, creation)
        except IntegrityError as error:
            if violated_constraint(error) == "users_email_key":
                raise AlreadyExists(
                    "a user with this email already exists", reason="EMAIL_ALREADY_REGISTERED"
                ) from None
            raise
        if row is not new_user:
            return user_message(row)
        annotate_log(user_id=user.id, email=mask_email(email))
        return user

    def GetUser(
        self, request: users_pb2.GetUserRequest, context: grpc.ServicerContext
    ) -> users_pb2.User:
        user_id = parse_id(request.id)
        row = self._database.fetch_one(SELECT_USER, {"id": user_id})
        if row is None:
            raise NotFound(f"user {user_id} does not exist", reason="USER_NOT_FOUND")
        return user_message(UserRow(*row))

    def ListUsers(
        self, request: users_pb2.ListUsersRequest, context: grpc.ServicerContext
    ) -> users_pb2.ListUsersResponse:
        rows, next_page_token = fetch_page(
            self._database,
            ListQuery("users", UserRow, USER_COLUMNS, equal_to={}),
            request.page_size,
            request.page_token,
            list_filter="",
        )
        return users_pb2.ListUsersResponse(
            users=[user_message(row) for row in rows], next_page_token=next_page_token
        )


# Who may call what: accounts are made and listed by admins; a user reads its own.
ACCESS: AccessTable = {
    "CreateUser": Admin(),
    "GetUser": ForUser("id"),
    "ListUsers": Admin(),
}

DEFINITION = ServiceDefinition(
    full_name=users_pb2.DESCRIPTOR.services_by_name["UserService"].full_name,
    register=lambda server, resources: users_pb2_grpc.add_UserServiceServicer_to_server(
        UserServicer(resources), server
    ),
    access=ACCESS,
)
