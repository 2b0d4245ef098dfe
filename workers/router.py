"""Spread requests over teacher endpoints, and keep failing ones out of the way.

- Fewest in flight first, each endpoint under a cap (this worker's share of the job-wide
  ``in_flight_per_endpoint``); ties go to the endpoint that has served least, so a retry moves
  to another endpoint.
- Circuit breaker: ``failure_threshold`` consecutive connection failures, timeouts or 5xx open
  an endpoint's circuit; it gets no requests until its ``/health`` answers again (checked every
  ``cooldown_s``), then closes.
- The endpoint set can change while requests run (a managed replica restarted on a new port):
  ``set_endpoints`` adds and removes; requests already in flight finish or fail and are retried.

Plain asyncio, one instance per worker process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

HealthCheck = Callable[[str], Awaitable[bool]]


class Router:
    def __init__(
        self,
        endpoints: list[str],
        cap_per_endpoint: int,
        *,
        health_check: HealthCheck | None = None,
        failure_threshold: int = 5,
        cooldown_s: float = 2.0,
    ) -> None:
        if not endpoints:
            raise ValueError("router needs at least one endpoint")
        self.cap = max(1, cap_per_endpoint)
        self.health_check = health_check
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.endpoints: list[str] = []
        self.in_flight: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.open: set[str] = set()
        self.circuit_opened = 0  # how often any circuit opened (reported in stats)
        self._probes: dict[str, asyncio.Task] = {}
        self._changed = asyncio.Condition()
        self._add(endpoints)

    def _add(self, endpoints: list[str]) -> None:
        for e in endpoints:
            if e not in self.endpoints:
                self.endpoints.append(e)
                self.in_flight.setdefault(e, 0)
                self.requests.setdefault(e, 0)
                self.failures[e] = 0

    async def set_endpoints(self, endpoints: list[str]) -> None:
        """Replace the endpoint set (e.g. a replica came back on a new URL)."""
        async with self._changed:
            for gone in [e for e in self.endpoints if e not in endpoints]:
                self.endpoints.remove(gone)
                self.open.discard(gone)
                probe = self._probes.pop(gone, None)
                if probe:
                    probe.cancel()
            self._add(endpoints)
            self._changed.notify_all()

    def _pick(self) -> str | None:
        usable = [e for e in self.endpoints if e not in self.open and self.in_flight[e] < self.cap]
        if not usable:
            return None
        return min(usable, key=lambda e: (self.in_flight[e], self.requests[e]))

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[str]:
        """Hold one request slot on the best endpoint for the duration of the block."""
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
                self._changed.notify()  # one slot freed: wake one waiter, not every queued row

    async def report(self, endpoint: str, ok: bool) -> None:
        """Outcome of one request: ``ok`` unless the endpoint itself failed."""
        async with self._changed:
            if endpoint not in self.failures:
                return  # removed meanwhile
            if ok:
                self.failures[endpoint] = 0
                return
            self.failures[endpoint] += 1
            if self.failures[endpoint] >= self.failure_threshold and endpoint not in self.open:
                self.open.add(endpoint)
                self.circuit_opened += 1
                self._probes[endpoint] = asyncio.create_task(self._probe(endpoint))

    async def _probe(self, endpoint: str) -> None:
        """Every cool-down, check the endpoint's health (if we can); close it once it answers."""
        while True:
            await asyncio.sleep(self.cooldown_s)
            try:
                healthy = self.health_check is None or await self.health_check(endpoint)
            except Exception:  # a failing check is just "not yet"
                healthy = False
            if healthy:
                break
        async with self._changed:
            self.open.discard(endpoint)
            self.failures[endpoint] = 0
            self._probes.pop(endpoint, None)
            self._changed.notify_all()

    async def aclose(self) -> None:
        for task in self._probes.values():
            task.cancel()
