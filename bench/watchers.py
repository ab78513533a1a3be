"""What open WatchOrder streams cost the unary calls of the same order_service: a thousand
watchers held open by the bench (grpc.aio in a thread of its own: a task per stream, not a
thread), GetOrder measured with and without them in alternating rounds."""

from __future__ import annotations

import asyncio
import statistics
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import grpc
from ecommerce.v1 import orders_pb2, orders_pb2_grpc

from bench.ghz import RpcFigures
from servicekit.local_credentials import tls_of, token
from servicekit.tls import channel_credentials

WATCHERS = 1000
STREAMS_PER_CONNECTION = 100  # the server's max_concurrent_streams


class OpenWatchers:
    """`count` WatchOrder streams of orders that stay CREATED, open until `close`."""

    def __init__(self, address: str, order_ids: list[str]) -> None:
        self._address = address
        self._order_ids = order_ids
        self._loop = asyncio.new_event_loop()
        self._opened = threading.Event()
        self.open_streams = 0
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._main = asyncio.run_coroutine_threadsafe(self._hold(), self._loop)

    def wait_open(self, timeout: float) -> bool:
        """Whether every stream answered with the order (so is open on the server) in time."""
        return self._opened.wait(timeout)

    def close(self) -> None:
        self._main.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    async def _hold(self) -> None:
        credentials = grpc.composite_channel_credentials(
            channel_credentials(tls_of("client")), grpc.access_token_call_credentials(token())
        )
        # Each its own connection: alike channels would share one by default.
        channels = [
            grpc.aio.secure_channel(
                self._address, credentials, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(-(-len(self._order_ids) // STREAMS_PER_CONNECTION))
        ]
        stubs = [orders_pb2_grpc.OrderServiceStub(channel) for channel in channels]
        try:
            await asyncio.gather(
                *(
                    self._watch(stubs[index % len(stubs)], order_id)
                    for index, order_id in enumerate(self._order_ids)
                )
            )
        finally:
            for channel in channels:
                await channel.close(grace=None)

    async def _watch(self, stub: orders_pb2_grpc.OrderServiceStub, order_id: str) -> None:
        # On an aio channel the stub's stream is async (the generated stubs type the sync one).
        stream = cast(
            AsyncIterator[orders_pb2.Order],
            stub.WatchOrder(orders_pb2.WatchOrderRequest(id=order_id)),
        )
        async for _order in stream:
            self.open_streams += 1
            if self.open_streams == len(self._order_ids):
                self._opened.set()


@dataclass
class WatcherRounds:
    """GetOrder's figures without and with the watchers open, one entry per round."""

    without: list[RpcFigures] = field(default_factory=list)
    with_watchers: list[RpcFigures] = field(default_factory=list)

    def median_ratio(self, figure: str) -> float:
        """The median over rounds of (with ÷ without) for an RpcFigures field."""
        pairs = zip(self.with_watchers, self.without, strict=True)
        return float(
            statistics.median(getattr(on, figure) / getattr(off, figure) for on, off in pairs)
        )
