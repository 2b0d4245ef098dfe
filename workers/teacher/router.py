"""Spread requests over teacher endpoints, keep failing ones out of the way, bound outages.

- Fewest in flight first, each endpoint under a cap (this worker's share of the job-wide
  ``in_flight_per_endpoint``); ties go to the endpoint that has served least, so a retry moves
  to another endpoint.
- Circuit breaker: ``failure_threshold`` consecutive connection failures, timeouts or 5xx open
  an endpoint's circuit; it gets no requests until its ``/health`` answers again (checked every
  ``cooldown_s``), then closes.
- ``Retry-After``: a 429 pauses *the endpoint* for every request of this worker (and, through
  ``on_pause``, of every other worker) until the time it names has passed.
- Outage: while no endpoint is usable (every circuit open or paused), requests wait here and are
  not turned into failures. The outage clock starts whatever made the last endpoint unusable
  (a circuit opening, a pause, an endpoint removed), from the first failure that began that
  endpoint's trouble, and it is checked again before every wait, so no request can wait
  without a deadline. It ends only with a success on a usable endpoint: an answer from one
  out of rotation is to a request sent before it went out. If it lasts
  ``outage_timeout_s``, every waiting request raises ``TeacherOutage`` and the job stops.
- The endpoint set can change while requests run (a managed replica restarted on a new port):
  ``set_endpoints`` adds and removes; requests already in flight finish or fail and are retried.

Plain asyncio, one instance per worker process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from workers.errors import TeacherOutage

HealthCheck = Callable[[str], Awaitable[bool]]
PauseListener = Callable[[str, float], None]  # (endpoint, until as a wall-clock timestamp)
Sleep = Callable[[float], Awaitable[None]]


@dataclass
class _Endpoint:
    url: str
    in_flight: int = 0
    requests: int = 0
    failures: int = 0  # consecutive endpoint failures
    open: bool = False  # circuit open: waiting for /health
    paused_until: float = 0.0  # monotonic; a 429 asked us to stay away until then
    pauses: int = 0  # consecutive 429s: backoff when the server names no Retry-After
    down_since: float | None = None  # wall clock, while open or paused
    reason: str = ""  # why it is down (error class or "429 Retry-After")
    trouble_since: float | None = None  # router clock: first failure or pause since a success


@dataclass(frozen=True)
class EndpointDown:
    """One endpoint that takes no requests now, for progress lines and logs."""

    endpoint: str
    state: str  # "circuit open" or "paused (429)"
    since: float  # wall clock
    reason: str

    def describe(self) -> str:
        at = datetime.fromtimestamp(self.since, UTC).strftime("%H:%M:%S UTC")
        return f"{self.endpoint} {self.state} since {at} ({self.reason})"


class Router:
    def __init__(
        self,
        endpoints: list[str],
        cap_per_endpoint: int,
        *,
        health_check: HealthCheck | None = None,
        failure_threshold: int = 5,
        cooldown_s: float = 2.0,
        outage_timeout_s: float = 600.0,
        pause_backoff: tuple[float, float] = (0.5, 30.0),
        on_pause: PauseListener | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not endpoints:
            raise ValueError("router needs at least one endpoint")
        self.cap = max(1, cap_per_endpoint)
        self.health_check = health_check
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.outage_timeout_s = outage_timeout_s
        self.pause_backoff = pause_backoff
        self.on_pause = on_pause
        self._clock = clock
        self._sleep = sleep  # with ``clock``: tests drive both from one virtual clock
        self._eps: dict[str, _Endpoint] = {}
        self.circuit_opened = 0  # how often any circuit opened (reported in stats)
        self.outage_since: float | None = None  # monotonic; no endpoint usable since then
        self._probes: dict[str, asyncio.Task] = {}
        self._timers: set[asyncio.Task] = set()
        self._changed = asyncio.Condition()
        self._add(endpoints)

    @property
    def endpoints(self) -> list[str]:
        return list(self._eps)

    @property
    def requests(self) -> dict[str, int]:
        return {url: ep.requests for url, ep in self._eps.items()}

    def in_flight_total(self) -> int:
        return sum(ep.in_flight for ep in self._eps.values())

    def _add(self, endpoints: list[str]) -> None:
        for url in endpoints:
            self._eps.setdefault(url, _Endpoint(url))

    async def set_endpoints(self, endpoints: list[str]) -> None:
        """Replace the endpoint set (e.g. a replica came back on a new URL)."""
        async with self._changed:
            for gone in [url for url in self._eps if url not in endpoints]:
                del self._eps[gone]
                probe = self._probes.pop(gone, None)
                if probe:
                    probe.cancel()
            self._add(endpoints)
            self._update_outage()
            self._changed.notify_all()

    async def set_cap(self, cap_per_endpoint: int) -> None:
        """A new share of the job's in-flight cap (the driver moves an idle worker's share to
        the workers that still have rows); waiting rows take the new slots at once."""
        async with self._changed:
            self.cap = max(1, cap_per_endpoint)
            self._changed.notify_all()

    def _usable(self, ep: _Endpoint) -> bool:
        return not ep.open and ep.paused_until <= self._clock()

    def _pick(self, weight: int = 1) -> _Endpoint | None:
        """The best usable endpoint with room for ``weight`` slots (an idle one takes any
        weight, so a batch larger than the cap still goes, alone)."""
        usable = [
            ep
            for ep in self._eps.values()
            if self._usable(ep) and (ep.in_flight + weight <= self.cap or not ep.in_flight)
        ]
        if not usable:
            return None
        return min(usable, key=lambda ep: (ep.in_flight, ep.requests))

    def _update_outage(self) -> None:
        """Start the outage clock when no endpoint is usable, whatever made it so; only a success
        on a usable endpoint stops it (``report``). An alarm wakes the waiting requests at the
        deadline, so they can give up. Called after every change of an endpoint's state and
        before every wait."""
        if self.outage_since is not None or any(map(self._usable, self._eps.values())):
            return
        now = self._clock()
        # Since the last usable endpoint's trouble began (its first failure, not the one that
        # opened its circuit: a lone row's retries back off for seconds before that).
        starts = [ep.trouble_since for ep in self._eps.values() if ep.trouble_since is not None]
        whole = starts and len(starts) == len(self._eps)
        self.outage_since = min(now, max(starts)) if whole else now
        self._timers.add(asyncio.create_task(self._wake_at(self._outage_deadline())))

    def _outage_deadline(self) -> float:
        assert self.outage_since is not None
        return self.outage_since + self.outage_timeout_s

    def _outage_error(self) -> TeacherOutage:
        down = "; ".join(d.describe() for d in self.down()) or ", ".join(self._eps)
        return TeacherOutage(
            f"no teacher endpoint answered for {self.outage_timeout_s:g} s "
            f"(teacher.outage_timeout_s): {down}"
        )

    @asynccontextmanager
    async def acquire(self, weight: int = 1) -> AsyncIterator[str]:
        """Hold ``weight`` slots (one per sequence the request carries: a score batch holds its
        rows') on the best endpoint for the duration of the block.

        Waits while every endpoint is busy, open or paused; raises ``TeacherOutage`` once no
        endpoint has been usable for ``outage_timeout_s``."""
        async with self._changed:
            while (ep := self._pick(weight)) is None:
                # No timeout on the wait itself: cancelling Condition.wait can leave its lock
                # released on Python 3.11. The outage alarm (``_update_outage``) wakes us.
                self._update_outage()
                if self.outage_since is not None and self._clock() >= self._outage_deadline():
                    raise self._outage_error()
                await self._changed.wait()
            ep.in_flight += weight
            ep.requests += 1
        try:
            yield ep.url
        finally:
            async with self._changed:
                ep.in_flight -= weight
                self._changed.notify(weight)  # as many waiters as slots freed, not every row

    async def report(self, endpoint: str, ok: bool, reason: str = "") -> bool:
        """Outcome of one request: ``ok`` unless the endpoint itself failed. Returns whether the
        endpoint is now out of rotation (its circuit open), i.e. the teacher, not the row, is at
        fault."""
        async with self._changed:
            ep = self._eps.get(endpoint)
            if ep is None:
                return False  # removed meanwhile
            if ok:
                ep.failures = ep.pauses = 0
                # No request is sent to an endpoint out of rotation: an answer from one was
                # sent before it went out, and says nothing about it now (a server shutting
                # down still answers what it had while it refuses new connections).
                if self._usable(ep):
                    ep.reason, ep.down_since, ep.trouble_since = "", None, None
                    self.outage_since = None
                return False
            now = self._clock()
            ep.failures += 1
            if ep.trouble_since is None:
                ep.trouble_since = now
            ep.reason = reason or ep.reason or "endpoint failure"
            if ep.failures >= self.failure_threshold and not ep.open:
                ep.open = True
                ep.down_since = ep.down_since or time.time()
                self.circuit_opened += 1
                self._probes[endpoint] = asyncio.create_task(self._probe(endpoint))
            self._update_outage()
            return ep.open

    async def pause(self, endpoint: str, retry_after: float | None) -> None:
        """A 429: keep every request away from ``endpoint`` for ``retry_after`` seconds (or a
        growing backoff when the server named none, or zero: a 429 is never answered at once,
        and it costs the row no attempt, so nothing else would slow a loop down), and tell the
        other workers."""
        ep = self._eps.get(endpoint)
        if ep is None:
            return
        if retry_after is None or retry_after <= 0:
            first, most = self.pause_backoff
            retry_after = min(most, first * 2**ep.pauses)
        ep.pauses += 1
        until_wall = time.time() + retry_after
        await self.pause_until(endpoint, until_wall)
        if self.on_pause is not None:
            self.on_pause(endpoint, until_wall)

    async def pause_until(self, endpoint: str, until_wall: float) -> None:
        """Keep requests away from ``endpoint`` until the wall-clock time ``until_wall``
        (sent by a worker that got the 429, or set by ``pause``)."""
        async with self._changed:
            ep = self._eps.get(endpoint)
            if ep is None:
                return
            delay = until_wall - time.time()
            if delay <= 0 or self._clock() + delay <= ep.paused_until:
                return
            ep.paused_until = self._clock() + delay
            ep.down_since = ep.down_since or time.time()
            if ep.trouble_since is None:
                ep.trouble_since = self._clock()
            ep.reason = "HTTP 429, Retry-After"
            self._update_outage()
            self._timers.add(asyncio.create_task(self._wake_at(ep.paused_until)))

    async def _wake_at(self, when: float) -> None:
        """Once the router's clock has passed ``when`` (a pause's end, the outage deadline), let
        the waiters look again. Loop timers may fire a little early (uvloop's count whole
        milliseconds): a waiter woken before the time would wait again with no one to wake it,
        so this sleeps until the time has really passed."""
        while (left := when - self._clock()) >= 0:
            await self._sleep(left + 0.001)
        async with self._changed:
            self._changed.notify_all()
        self._timers.discard(asyncio.current_task())

    async def _probe(self, endpoint: str) -> None:
        """Every cool-down, check the endpoint's health (if we can); close it once it answers."""
        while True:
            await self._sleep(self.cooldown_s)
            try:
                healthy = self.health_check is None or await self.health_check(endpoint)
            except Exception:  # a failing check is just "not yet"
                healthy = False
            if healthy:
                break
        async with self._changed:
            ep = self._eps.get(endpoint)
            if ep is not None:
                ep.open = False
                ep.failures = 0  # its trouble (and any outage) goes on until it answers
            self._probes.pop(endpoint, None)
            self._changed.notify_all()

    def down(self) -> list[EndpointDown]:
        """Endpoints that take no requests now, and since when."""
        now = self._clock()
        out = []
        for ep in self._eps.values():
            if ep.open:
                state = "circuit open"
            elif ep.paused_until > now:
                state = "paused (429)"
            else:
                continue
            out.append(EndpointDown(ep.url, state, ep.down_since or time.time(), ep.reason))
        return out

    async def aclose(self) -> None:
        for task in self._probes.values():
            task.cancel()
        for task in self._timers:
            task.cancel()
