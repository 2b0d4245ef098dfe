"""A virtual monotonic clock with its own ``sleep``, for timing tests that never wait for real.

Give ``clock`` and ``clock.sleep`` to the code under test (``Router(clock=..., sleep=...)``);
``await clock.advance(s)`` moves time on, waking every sleeper whose time has come in order and
letting the woken tasks run before the next one, so a test asserts what happened at each
virtual moment, on any machine load.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class VirtualClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.t + max(0.0, seconds), next(self._seq), fut))
        await fut

    @staticmethod
    async def settle() -> None:
        """Let every runnable task run until it waits again."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        end = self.t + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= end:
            when, _, fut = heapq.heappop(self._sleepers)
            self.t = max(self.t, when)
            if not fut.done():  # a cancelled sleeper is simply dropped
                fut.set_result(None)
            await self.settle()
        self.t = end
        await self.settle()
