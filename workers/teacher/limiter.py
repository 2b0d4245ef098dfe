"""Client-side rate limits (requests/s, tokens/min) that are never exceeded.

Sliding windows, not token buckets: a bucket lets a full burst land right after a refill, so
a one-second window could see up to twice the rate. Here any window of the configured length
holds at most the limit. Windows are 10% longer than nominal so the server, which sees our
requests a little later and with jitter, also never counts more than the limit.

Plain asyncio; each harvest worker runs one ``Limiter`` with its share of the job-wide limits
(``workers.actor``), and takes a permit right before each request is sent.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable

from schemas.teacher import RateLimit

MARGIN = 1.1


class _Event:
    """One reservation in a window; ``amount`` shrinks when the answer used less."""

    __slots__ = ("amount", "in_window", "time")

    def __init__(self, time: float, amount: float) -> None:
        self.time, self.amount, self.in_window = time, amount, True


class SlidingWindow:
    """At most ``limit`` units in any ``window_s``-second window."""

    def __init__(self, limit: float, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self.events: deque[_Event] = deque()
        self.used = 0.0

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` more fits (0 if it fits now)."""
        while self.events and self.events[0].time <= now - self.window_s:
            gone = self.events.popleft()
            gone.in_window = False
            self.used -= gone.amount
        # A single request larger than the limit may go once the window is empty.
        if self.used + amount <= self.limit or not self.events:
            return 0.0
        return self.events[0].time + self.window_s - now

    def take(self, amount: float, now: float) -> _Event:
        event = _Event(now, amount)
        self.events.append(event)
        self.used += amount
        return event

    def give_back(self, event: _Event, keep: float) -> None:
        """Shrink a reservation to what was used; one that already left the window counts
        nowhere any more, so there is nothing to give back (it would drive ``used`` below the
        real load and let too much through)."""
        if event.in_window and keep < event.amount:
            self.used -= event.amount - keep
            event.amount = keep


def worker_share(limit: RateLimit, workers: int) -> RateLimit:
    """One worker's share of the job-wide limits: the shares add up to at most the limit."""
    return RateLimit(
        requests_per_s=limit.requests_per_s / workers if limit.requests_per_s else None,
        tokens_per_min=max(1, limit.tokens_per_min // workers) if limit.tokens_per_min else None,
    )


class Limiter:
    """Both limits of a job; ``acquire`` before each request, ``settle`` with real tokens."""

    def __init__(
        self,
        spec: RateLimit,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock, self._sleep = clock, sleep  # injectable: tests run on a virtual clock
        rps, tpm = spec.requests_per_s, spec.tokens_per_min
        self.requests = SlidingWindow(rps, 1.0 * MARGIN) if rps else None
        self.tokens = SlidingWindow(tpm, 60.0 * MARGIN) if tpm else None
        self._lock = asyncio.Lock()
        self._ids = itertools.count()
        self._reserved: dict[int, _Event] = {}

    async def acquire(self, max_tokens: int) -> int:
        """Wait until one more request reserving ``max_tokens`` fits both windows."""
        async with self._lock:  # one waiter at a time: requests go in arrival order
            while True:
                now = self._clock()
                wait = max(
                    self.requests.wait_for(1, now) if self.requests else 0.0,
                    self.tokens.wait_for(max_tokens, now) if self.tokens else 0.0,
                )
                if wait <= 0:
                    break
                await self._sleep(wait)
            handle = next(self._ids)
            if self.requests:
                self.requests.take(1, now)
            if self.tokens:
                self._reserved[handle] = self.tokens.take(max_tokens, now)
            return handle

    async def settle(self, handle: int, used_tokens: int) -> None:
        """Give back the part of a reservation the answer did not use."""
        event = self._reserved.pop(handle, None)
        if event is not None and self.tokens is not None:
            self.tokens.give_back(event, used_tokens)
