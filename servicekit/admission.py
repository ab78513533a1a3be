"""Backpressure: a service refuses new work while the work it already accepted is late.

The signal is the pipeline delay seen where work completes: how long the work just completed
waited since it was accepted. Above `bound` seconds a share of new calls is shed, growing to all
of them at twice the bound, each refusal a RESOURCE_EXHAUSTED with a RetryInfo delay. Shedding a
share, not all, keeps the accepted rate near what the pipeline sustains.

The signal counts only while it is fresh: when nothing completes at all (the consumer stopped),
there is no delay to report and nothing is shed. Accepting work that will wait for a restart is
better than refusing all of it for an outage that shedding cannot shorten; the outage shows in
health instead.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable

from servicekit.errors import ResourceExhausted
from servicekit.metrics import SHED_CALLS
from servicekit.settings import BackpressureSettings

# How long a delay seen at completion stays the pipeline's delay.
SIGNAL_TTL_SECONDS = 1.0


class PipelineDelayShedder:
    def __init__(
        self,
        settings: BackpressureSettings,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._enabled = settings.enabled
        self._bound = settings.delay_seconds
        self._clock = clock
        self._draw = draw
        self._lock = threading.Lock()
        self._delay = 0.0
        self._seen_at = float("-inf")

    def observe(self, delays: Iterable[float]) -> None:
        """Delays (seconds) of work completed together; their median is the pipeline's delay."""
        delays = list(delays)
        if not delays:
            return
        with self._lock:
            self._delay = statistics.median(delays)
            self._seen_at = self._clock()

    def delay(self) -> float:
        with self._lock:
            fresh = self._clock() - self._seen_at <= SIGNAL_TTL_SECONDS
            return self._delay if fresh else 0.0

    def shed_share(self) -> float:
        """The share of new calls refused now: 0 up to the bound, 1 from twice the bound on."""
        if not self._enabled:
            return 0.0
        return min(max((self.delay() - self._bound) / self._bound, 0.0), 1.0)

    def admit(self) -> None:
        """Returns, or raises ResourceExhausted for a call shed to let the pipeline catch up."""
        share = self.shed_share()
        if share > 0 and self._draw() < share:
            delay = self.delay()
            SHED_CALLS.labels("PIPELINE_BEHIND").inc()
            raise ResourceExhausted(
                f"accepted work completes {delay:.2f} s after it is accepted, above the"
                f" {self._bound:g} s this service allows; retry after the RetryInfo delay",
                retry_after=max(delay - self._bound, 0.05),
                reason="PIPELINE_BEHIND",
            )
