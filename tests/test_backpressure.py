"""CreateOrder sheds load while settled orders show the pipeline behind, and only then."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from ecommerce.v1 import orders_pb2, orders_pb2_grpc, users_pb2
from sqlalchemy import Engine

from order_service.service import DEFINITION as ORDER_SERVICE
from servicekit.admission import SIGNAL_TTL_SECONDS, PipelineDelayShedder
from servicekit.errors import ResourceExhausted
from servicekit.local_credentials import channel, token
from servicekit.server import start_service
from servicekit.settings import BackpressureSettings
from tests.conftest import service_settings
from tests.rpc_errors import call_fails
from tests.test_orders import PROCESSED, count_orders, place, usd

BOUND_SECONDS = 0.1


@pytest.fixture
def shedding_orders(database_url: str) -> Iterator[orders_pb2_grpc.OrderServiceStub]:
    settings = service_settings(
        "order_service",
        BACKPRESSURE_ENABLED="true",
        BACKPRESSURE_DELAY_SECONDS=str(BOUND_SECONDS),
    )
    running = start_service(ORDER_SERVICE, settings)
    try:
        # The processor's certificate (to settle) with an admin's token (to place and read).
        address = f"127.0.0.1:{running.port}"
        with channel(address, "processor", bearer=token()) as processor_channel:
            yield orders_pb2_grpc.OrderServiceStub(processor_channel)
    finally:
        running.stop(grace_seconds=1)


def settle_late(stub: orders_pb2_grpc.OrderServiceStub, user_id: str, late_by: float) -> None:
    """Settles an order `late_by` seconds after placing it, as a slow pipeline would."""
    order = place(stub, user_id, usd(3))
    time.sleep(late_by)
    change = orders_pb2.UpdateOrderStatusRequest(id=order.id, status=PROCESSED)
    stub.BatchUpdateOrderStatus(orders_pb2.BatchUpdateOrderStatusRequest(requests=[change]))


def test_create_order_is_shed_with_retry_info_while_orders_settle_late(
    shedding_orders: orders_pb2_grpc.OrderServiceStub, user: users_pb2.User, engine: Engine
) -> None:
    settle_late(shedding_orders, user.id, late_by=3 * BOUND_SECONDS)
    before = count_orders(engine)

    failure = call_fails(
        shedding_orders.CreateOrder,
        orders_pb2.CreateOrderRequest(user_id=user.id, amount=usd(4)),
    )

    assert failure.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failure.reason == "PIPELINE_BEHIND"
    assert failure.retry_delay_seconds is not None and failure.retry_delay_seconds > 0
    assert count_orders(engine) == before  # a shed call changes nothing
    # Reads and settlements are never shed.
    assert shedding_orders.ListOrders(orders_pb2.ListOrdersRequest(user_id=user.id)).orders


def test_shedding_ends_when_nothing_settles_late_any_more(
    shedding_orders: orders_pb2_grpc.OrderServiceStub, user: users_pb2.User
) -> None:
    settle_late(shedding_orders, user.id, late_by=3 * BOUND_SECONDS)
    # A stopped processor settles nothing: the signal goes stale and orders are accepted again.
    time.sleep(SIGNAL_TTL_SECONDS + 0.1)
    assert place(shedding_orders, user.id, usd(5)).id


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_shed_share_grows_from_the_bound_to_twice_the_bound() -> None:
    clock = FakeClock()
    shedder = PipelineDelayShedder(BackpressureSettings(True, 1.0), clock=clock, draw=lambda: 0.5)
    for delays, share in (([0.2], 0.0), ([1.0], 0.0), ([0.1, 1.4, 1.6], 0.4), ([3.0], 1.0)):
        shedder.observe(delays)
        assert shedder.shed_share() == pytest.approx(share)
    with pytest.raises(ResourceExhausted) as shed:
        shedder.admit()
    assert shed.value.retry_after == pytest.approx(2.0)
    clock.now += SIGNAL_TTL_SECONDS + 0.01
    assert shedder.shed_share() == 0.0
    shedder.admit()


def test_a_disabled_shedder_never_sheds() -> None:
    shedder = PipelineDelayShedder(BackpressureSettings(False, 0.1))
    shedder.observe([60.0])
    assert shedder.shed_share() == 0.0
