"""Spread requests over teacher endpoints: fewest in flight first, each under a cap.

Plain asyncio, one instance per worker process. The per-endpoint cap here is this worker's
share of the job-wide ``in_flight_per_endpoint`` (the scheduler divides it among workers).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Router:
    def __init__(self, endpoints: list[str], cap_per_endpoint: int) -> None:
        if not endpoints:
            raise ValueError("router needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.cap = max(1, cap_per_endpoint)
        self.in_flight = dict.fromkeys(self.endpoints, 0)
        self.requests = dict.fromkeys(self.endpoints, 0)
        self._changed = asyncio.Condition()

    def _pick(self) -> str | None:
        # ties go to the endpoint that has served least, so retries move to another endpoint
        best = min(self.endpoints, key=lambda e: (self.in_flight[e], self.requests[e]))
        return best if self.in_flight[best] < self.cap else None

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[str]:
        """Hold one request slot on the least busy endpoint for the duration of the block."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._pick() is not None)
            endpoint = self._pick()
            assert endpoint is not None
            self.in_flight[endpoint] += 1
            self.requests[endpoint] += 1
        try:
            yield endpoint
        finally:
            async with self._changed:
                self.in_flight[endpoint] -= 1
                self._changed.notify()
