"""UserService's domain logic."""

from __future__ import annotations

import logging

import grpc
from ecommerce.events.v1 import events_pb2
from ecommerce.v1 import users_pb2, users_pb2_grpc
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from servicekit.db import violated_constraint
from servicekit.errors import AlreadyExists, NotFound
from servicekit.fields import parse_id, parse_request_id, to_timestamp
from servicekit.idempotency import create_once
from servicekit.jsonlog import mask_email
from servicekit.models import UserRecord
from servicekit.outbox import new_event_id, stage_event
from servicekit.pagination import fetch_page
from servicekit.server import ServiceDefinition, ServiceResources
from user_service.validation import normalise_email, normalise_name

log = logging.getLogger("user_service")


def user_message(record: UserRecord) -> users_pb2.User:
    return users_pb2.User(
        id=str(record.id),
        email=record.email,
        name=record.name,
        create_time=to_timestamp(record.create_time),
    )


class UserServicer(users_pb2_grpc.UserServiceServicer):
    def __init__(self, resources: ServiceResources) -> None:
        self._sessions = resources.sessions
        self._users_topic = resources.settings.kafka.users_topic
        self._event_source = resources.event_source

    def _announce(self, session: Session, record: UserRecord) -> None:
        user = user_message(record)
        stage_event(
            session,
            topic=self._users_topic,
            key=user.id,
            source=self._event_source,
            event=events_pb2.UserCreated(
                event_id=new_event_id(), user=user, occur_time=user.create_time
            ),
        )

    def CreateUser(
        self, request: users_pb2.CreateUserRequest, context: grpc.ServicerContext
    ) -> users_pb2.User:
        email = normalise_email(request.email)
        name = normalise_name(request.name)
        request_id = parse_request_id(request.request_id)
        try:
            record = create_once(
                self._sessions,
                UserRecord(email=email, name=name, request_id=request_id),
                same_request=lambda earlier: (earlier.email, earlier.name) == (email, name),
                in_same_transaction=self._announce,
            )
        except IntegrityError as error:
            if violated_constraint(error) == "users_email_key":
                raise AlreadyExists(
                    "a user with this email already exists", reason="EMAIL_ALREADY_REGISTERED"
                ) from None
            raise
        log.info(
            "user created",
            extra={"fields": {"user_id": str(record.id), "email": mask_email(email)}},
        )
        return user_message(record)

    def GetUser(
        self, request: users_pb2.GetUserRequest, context: grpc.ServicerContext
    ) -> users_pb2.User:
        user_id = parse_id(request.id)
        with self._sessions() as session:
            record = session.get(UserRecord, user_id)
        if record is None:
            raise NotFound(f"user {user_id} does not exist", reason="USER_NOT_FOUND")
        return user_message(record)

    def ListUsers(
        self, request: users_pb2.ListUsersRequest, context: grpc.ServicerContext
    ) -> users_pb2.ListUsersResponse:
        with self._sessions() as session:
            records, next_page_token = fetch_page(
                session,
                select(UserRecord),
                (UserRecord.create_time, UserRecord.id),
                request.page_size,
                request.page_token,
                list_filter="",
            )
        return users_pb2.ListUsersResponse(
            users=[user_message(record) for record in records], next_page_token=next_page_token
        )


DEFINITION = ServiceDefinition(
    full_name=users_pb2.DESCRIPTOR.services_by_name["UserService"].full_name,
    register=lambda server, resources: users_pb2_grpc.add_UserServiceServicer_to_server(
        UserServicer(resources), server
    ),
)
