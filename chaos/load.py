"""A steady, bounded CreateOrder load spread over the replicas of order_service (round-robin per
call; a retry goes to the next replica), retrying each request with its request_id like a careful
client, and recording what was acknowledged and every failed attempt's status code."""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import grpc
from ecommerce.v1 import orders_pb2, orders_pb2_grpc
from google.type import money_pb2

from servicekit.local_credentials import tls_of, token
from servicekit.retry import TRANSIENT_CODES, retry_delay
from servicekit.tls import open_channel

# The certificates name 127.0.0.1 and localhost, not a network namespace's address: a replica
# there is checked against this name.
SERVER_NAME = "localhost"
# A RetryInfo delay is honoured up to this: a pipeline catching up on minutes of backlog asks for
# minutes, and the load must stay bounded in time.
MAX_RETRY_DELAY_SECONDS = 5.0


def admin_channel_to(address: str) -> grpc.Channel:
    """As the operator, to a replica at `address` (loopback or a namespace's)."""
    return open_channel(address, tls_of("client"), token(), server_identity=SERVER_NAME)


# Mixed outcomes under the default rule: two processed, two failed.
AMOUNTS = (
    money_pb2.Money(currency_code="USD", units=42, nanos=500_000_000),
    money_pb2.Money(currency_code="EUR", units=9_999),
    money_pb2.Money(currency_code="JPY", units=100),
    money_pb2.Money(currency_code="GBP", units=25_000),
)


@dataclass
class LoadResult:
    acknowledged: list[str] = field(default_factory=list)  # order ids the server confirmed
    failed_attempts: Counter[str] = field(default_factory=Counter)  # status code -> attempts
    abandoned: int = 0  # requests given up on (never acknowledged, so nothing is owed)


class OrderLoad:
    def __init__(
        self,
        addresses: list[str],
        user_ids: list[str],
        total: int,
        workers: int = 8,
        time_limit: float = 600.0,
        rate: float | None = None,
        paced_from: int = 0,
    ) -> None:
        """`rate`: orders started per second from order number `paced_from` on (the ones before
        go as fast as the workers go, as all do without a rate)."""
        self._addresses = addresses
        self._rate = rate
        self._paced_from = paced_from
        self._started = time.monotonic()
        self._user_ids = user_ids
        self._total = total
        self._workers = workers
        self._deadline = time.monotonic() + time_limit
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.result = LoadResult()

    def start(self) -> None:
        for _ in range(self._workers):
            thread = threading.Thread(target=self._work, daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self) -> LoadResult:
        for thread in self._threads:
            thread.join()
        return self.result

    @property
    def acknowledged_count(self) -> int:
        with self._lock:
            return len(self.result.acknowledged)

    def _work(self) -> None:
        channels = [admin_channel_to(address) for address in self._addresses]
        stubs = [orders_pb2_grpc.OrderServiceStub(channel) for channel in channels]
        try:
            while time.monotonic() < self._deadline:
                number = next(self._numbers)
                if number >= self._total:
                    return
                if self._rate and number >= self._paced_from:
                    due = self._started + (number - self._paced_from) / self._rate
                    time.sleep(max(0.0, min(due, self._deadline) - time.monotonic()))
                request = orders_pb2.CreateOrderRequest(
                    user_id=self._user_ids[number % len(self._user_ids)],
                    amount=AMOUNTS[number % len(AMOUNTS)],
                    request_id=str(uuid.uuid4()),
                )
                self._place(stubs, number, request)
        finally:
            for channel in channels:
                channel.close()

    # CANCELLED counts as transient too: a stopping server cancels calls it has not started.
    def _place(
        self,
        stubs: list[orders_pb2_grpc.OrderServiceStub],
        number: int,
        request: orders_pb2.CreateOrderRequest,
    ) -> None:
        delay = 0.05
        for attempt in range(40):
            stub = stubs[(number + attempt) % len(stubs)]
            try:
                order = stub.CreateOrder(request, timeout=5)
            except grpc.RpcError as error:
                code = error.code()
                with self._lock:
                    self.result.failed_attempts[code.name] += 1
                if code not in TRANSIENT_CODES and code is not grpc.StatusCode.CANCELLED:
                    break
                asked = retry_delay(error)
                time.sleep(
                    min(asked, MAX_RETRY_DELAY_SECONDS) if asked else random.uniform(0, delay)
                )
                delay = min(delay * 2, 1.0)
                continue
            with self._lock:
                self.result.acknowledged.append(order.id)
            return
        with self._lock:
            self.result.abandoned += 1
