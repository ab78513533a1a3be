"""EcommerceClient: UserService and OrderService behind typed methods, with a deadline on every
call, gRPC's own retries of UNAVAILABLE, and a request_id on every create so retries are safe."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar

import grpc
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2, users_pb2_grpc

from ecommerce_client.errors import CallFailed, failure_of_error
from ecommerce_client.money import amount_to_money
from servicekit.settings import TlsSettings
from servicekit.tls import open_channel

SERVICES = ("ecommerce.v1.UserService", "ecommerce.v1.OrderService")
DEFAULT_DEADLINE_SECONDS = 10.0

Response = TypeVar("Response")


def retry_service_config(
    max_attempts: int = 5,
    initial_backoff_seconds: float = 0.1,
    max_backoff_seconds: float = 2.0,
    backoff_multiplier: float = 2.0,
) -> dict[str, Any]:
    """gRPC's service config retrying every method of both services on UNAVAILABLE (a server
    restarting or out of reach), with jittered exponential backoff, within the call's deadline.
    Every method may be retried: reads are safe, creates carry a request_id, and cancelling a
    cancelled order is a no-op."""
    return {
        "methodConfig": [
            {
                "name": [{"service": service} for service in SERVICES],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": f"{initial_backoff_seconds}s",
                    "maxBackoff": f"{max_backoff_seconds}s",
                    "backoffMultiplier": backoff_multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }


def channel_options(service_config: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    """The options of both channels: retries on, with `service_config` (the default's if None)."""
    config = retry_service_config() if service_config is None else service_config
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


class EcommerceClient:
    """Both services over mutual TLS, presenting `tls`'s certificate and the bearer `token` on
    every call. Unary calls end after `deadline_seconds`; a watch runs until its order is final
    unless given a timeout. Failures raise CallFailed. Close it, or use it as a context manager."""

    def __init__(
        self,
        users_address: str,
        orders_address: str,
        tls: TlsSettings,
        token: str,
        deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
        service_config: dict[str, Any] | None = None,
    ) -> None:
        self.deadline_seconds = deadline_seconds
        options = channel_options(service_config)
        self._channels: list[grpc.Channel] = []
        try:
            users = self._open(users_address, tls, token, options)
            orders = self._open(orders_address, tls, token, options)
        except BaseException:
            self.close()
            raise
        self._users = users_pb2_grpc.UserServiceStub(users)
        self._orders = orders_pb2_grpc.OrderServiceStub(orders)

    def _open(
        self, address: str, tls: TlsSettings, token: str, options: list[tuple[str, Any]]
    ) -> grpc.Channel:
        channel = open_channel(address, tls, token, options)
        self._channels.append(channel)
        return channel

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()

    def __enter__(self) -> EcommerceClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Callable[..., Response], name: str, request: Any) -> Response:
        try:
            return method(request, timeout=self.deadline_seconds)
        except grpc.RpcError as error:
            raise CallFailed(name, failure_of_error(error)) from error

    # UserService

    def create_user(self, email: str, name: str, request_id: str | None = None) -> users_pb2.User:
        """A new user (admin only). Without `request_id`, a fresh one: a retry creates no other."""
        request = users_pb2.CreateUserRequest(
            email=email, name=name, request_id=request_id or new_request_id()
        )
        return self._call(self._users.CreateUser, "CreateUser", request)

    def get_user(self, user_id: str) -> users_pb2.User:
        request = users_pb2.GetUserRequest(id=user_id)
        return self._call(self._users.GetUser, "GetUser", request)

    def list_users(self, page_size: int = 0, page_token: str = "") -> users_pb2.ListUsersResponse:
        """One page, oldest first; its next_page_token is empty on the last (admin only)."""
        request = users_pb2.ListUsersRequest(page_size=page_size, page_token=page_token)
        return self._call(self._users.ListUsers, "ListUsers", request)

    def iter_users(self, page_size: int = 0) -> Iterator[users_pb2.User]:
        """Every user, page after page."""
        page_token = ""
        while True:
            page = self.list_users(page_size, page_token)
            yield from page.users
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    # OrderService

    def create_order(
        self, user_id: str, amount: Decimal, currency: str, request_id: str | None = None
    ) -> orders_pb2.Order:
        """A new order of `amount` (a Decimal, never a float) in `currency` (ISO 4217). Without
        `request_id`, a fresh one: a retry creates no other order."""
        request = orders_pb2.CreateOrderRequest(
            user_id=user_id,
            amount=amount_to_money(amount, currency),
            request_id=request_id or new_request_id(),
        )
        return self._call(self._orders.CreateOrder, "CreateOrder", request)

    def get_order(self, order_id: str) -> orders_pb2.Order:
        request = orders_pb2.GetOrderRequest(id=order_id)
        return self._call(self._orders.GetOrder, "GetOrder", request)

    def list_orders(
        self, user_id: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> orders_pb2.ListOrdersResponse:
        """One page of a user's orders (every user's: admin only), oldest first."""
        request = orders_pb2.ListOrdersRequest(
            user_id=user_id or "", page_size=page_size, page_token=page_token
        )
        return self._call(self._orders.ListOrders, "ListOrders", request)

    def iter_orders(
        self, user_id: str | None = None, page_size: int = 0
    ) -> Iterator[orders_pb2.Order]:
        """Every order (of `user_id`, if given), page after page."""
        page_token = ""
        while True:
            page = self.list_orders(user_id, page_size, page_token)
            yield from page.orders
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    def watch_order(
        self, order_id: str, timeout: float | None = None
    ) -> Iterator[orders_pb2.Order]:
        """The order now, then again after each status change; ends once its status is final
        (PROCESSED, FAILED, CANCELLED). No deadline unless `timeout` is given. The call starts
        when iteration does, and is cancelled if iteration stops early."""
        request = orders_pb2.WatchOrderRequest(id=order_id)
        stream = self._orders.WatchOrder(request, timeout=timeout)
        try:
            yield from stream
        except grpc.RpcError as error:
            raise CallFailed("WatchOrder", failure_of_error(error)) from error
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs

    def cancel_order(self, order_id: str, reason: str = "") -> orders_pb2.Order:
        """The order, CANCELLED (its owner, while it is CREATED; again: a no-op)."""
        request = orders_pb2.CancelOrderRequest(id=order_id, reason=reason)
        return self._call(self._orders.CancelOrder, "CancelOrder", request)


def new_request_id() -> str:
    return str(uuid.uuid4())
