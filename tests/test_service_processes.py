"""The services as processes: grpcurl against them, health, reflection, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2
from google.type import money_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine, text

from servicekit import local_credentials as credentials
from servicekit.local_credentials import admin_channel
from tests.conftest import TEST_ENV, unique_email
from testsupport.processes import REPO, ServiceProcess, wait_until


def grpcurl_binary() -> str:
    found = os.environ.get("GRPCURL") or shutil.which("grpcurl", path=str(REPO / ".local/bin"))
    assert found, "grpcurl is not installed: run `make tools`"
    return found


def grpcurl(
    address: str,
    *args: str,
    data: dict[str, object] | None = None,
    identity: str = "client",
    bearer: str | None = "admin",
) -> subprocess.CompletedProcess[str]:
    """grpcurl as the README runs it: over mutual TLS with `identity`'s certificate and, unless
    `bearer` is None, a token with that scope."""
    tls = credentials.tls_of(identity)
    command = [grpcurl_binary(), "-cacert", tls.ca_file, "-cert", tls.cert_file]
    command += ["-key", tls.key_file, "-max-time", "10"]
    if bearer is not None:
        command += ["-H", f"authorization: Bearer {credentials.token(scopes=[bearer])}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run(
        [*command, address, *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.fixture(scope="module")
def user_process(database_url: str) -> Iterator[ServiceProcess]:
    process = ServiceProcess("user_service", "USER_SERVICE_PORT", TEST_ENV)
    yield process
    process.stop()


@pytest.fixture
def order_process(database_url: str) -> Iterator[ServiceProcess]:
    process = ServiceProcess("order_service", "ORDER_SERVICE_PORT", TEST_ENV)
    yield process
    process.stop()


def test_grpcurl_lists_service_health_and_reflection(
    user_process: ServiceProcess, order_process: ServiceProcess
) -> None:
    for process, service in (
        (user_process, "ecommerce.v1.UserService"),
        (order_process, "ecommerce.v1.OrderService"),
    ):
        listed = grpcurl(process.address, "list")
        assert listed.returncode == 0, listed.stderr
        assert set(listed.stdout.split()) >= {
            service,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        health = grpcurl(process.address, "grpc.health.v1.Health/Check", data={"service": service})
        assert json.loads(health.stdout) == {"status": "SERVING"}


def test_grpcurl_drives_every_rpc(
    user_process: ServiceProcess, order_process: ServiceProcess
) -> None:
    def call(process: ServiceProcess, method: str, data: dict[str, object]) -> dict[str, object]:
        result = grpcurl(process.address, method, data=data)
        assert result.returncode == 0, result.stderr
        reply: dict[str, object] = json.loads(result.stdout)
        return reply

    user = call(
        user_process,
        "ecommerce.v1.UserService/CreateUser",
        {"email": unique_email("cli"), "name": "Cli User", "request_id": str(uuid.uuid4())},
    )
    assert call(user_process, "ecommerce.v1.UserService/GetUser", {"id": user["id"]}) == user
    assert "users" in call(user_process, "ecommerce.v1.UserService/ListUsers", {"page_size": 1})

    order = call(
        order_process,
        "ecommerce.v1.OrderService/CreateOrder",
        {
            "user_id": user["id"],
            "amount": {"currency_code": "USD", "units": "25", "nanos": 500000000},
        },
    )
    assert order["status"] == "ORDER_STATUS_CREATED"
    assert call(order_process, "ecommerce.v1.OrderService/GetOrder", {"id": order["id"]}) == order
    listed = call(order_process, "ecommerce.v1.OrderService/ListOrders", {"user_id": user["id"]})
    assert listed["orders"] == [order]
    settle = {"id": order["id"], "status": "ORDER_STATUS_PROCESSED", "reason": "paid"}
    refused = grpcurl(
        order_process.address, "ecommerce.v1.OrderService/UpdateOrderStatus", data=settle
    )
    assert "Code: PermissionDenied" in refused.stderr  # an admin's token is not the processor
    updated = grpcurl(
        order_process.address,
        "ecommerce.v1.OrderService/UpdateOrderStatus",
        data=settle,
        identity="processor",
        bearer=None,
    )
    assert updated.returncode == 0, updated.stderr
    assert json.loads(updated.stdout)["status"] == "ORDER_STATUS_PROCESSED"

    missing = grpcurl(
        order_process.address, "ecommerce.v1.OrderService/GetOrder", data={"id": str(uuid.uuid4())}
    )
    assert missing.returncode != 0
    assert "Code: NotFound" in missing.stderr
    assert "ORDER_NOT_FOUND" in missing.stderr


def test_access_log_has_method_code_duration_and_no_email(user_process: ServiceProcess) -> None:
    email = unique_email("logged")
    grpcurl(
        user_process.address,
        "ecommerce.v1.UserService/CreateUser",
        data={"email": email, "name": "Logged"},
    )

    assert wait_until(
        lambda: any(
            line.get("method") == "/ecommerce.v1.UserService/CreateUser"
            for line in user_process.log_lines
        ),
        timeout=5,
    )
    access = [
        line
        for line in user_process.log_lines
        if line.get("method") == "/ecommerce.v1.UserService/CreateUser"
    ]
    assert access[-1]["code"] == "OK"
    assert isinstance(access[-1]["duration_ms"], float)
    assert all(email not in json.dumps(line) for line in user_process.log_lines)


def test_sigterm_lets_in_flight_rpcs_finish_then_exits_zero(
    order_process: ServiceProcess, user: users_pb2.User, engine: Engine
) -> None:
    with (
        admin_channel(order_process.address) as channel,
        credentials.channel(order_process.address, "processor") as processor_channel,
    ):
        orders = orders_pb2_grpc.OrderServiceStub(channel)
        settlements = orders_pb2_grpc.OrderServiceStub(processor_channel)
        order = orders.CreateOrder(
            orders_pb2.CreateOrderRequest(
                user_id=user.id, amount=money_pb2.Money(currency_code="USD", units=1)
            )
        )

        with engine.connect() as blocker, ThreadPoolExecutor(max_workers=1) as pool:
            # Hold the order's row lock so that UpdateOrderStatus is provably in flight.
            blocker.execute(
                text("SELECT 1 FROM orders WHERE id = :id FOR UPDATE"), {"id": order.id}
            )
            in_flight = pool.submit(
                settlements.UpdateOrderStatus,
                orders_pb2.UpdateOrderStatusRequest(
                    id=order.id, status=orders_pb2.ORDER_STATUS_PROCESSED
                ),
                timeout=20,
            )
            assert wait_until(lambda: _waits_for_lock(engine), timeout=10)

            order_process.terminate()
            assert wait_until(
                lambda: any(line.get("message") == "stopping" for line in order_process.log_lines),
                5,
            )
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE  # no new work accepted
            blocker.rollback()  # release the lock: the in-flight call may now finish

            assert in_flight.result().status == orders_pb2.ORDER_STATUS_PROCESSED
    assert order_process.wait(timeout=10) == 0


def _waits_for_lock(engine: Engine) -> bool:
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'order_service' AND wait_event_type = 'Lock'"
    )
    with engine.connect() as connection:
        return bool(connection.scalar(query))


def test_bad_settings_stop_the_process_with_a_clear_message(database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "user_service"],
        cwd=REPO,
        env={**os.environ, "USER_SERVICE_PORT": "not-a-port"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "USER_SERVICE_PORT must be an integer" in result.stderr
