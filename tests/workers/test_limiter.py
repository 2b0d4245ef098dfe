"""Rate limits: no sliding window ever holds more than the limit."""

from __future__ import annotations

import asyncio
import time

from windows import max_in_window

from schemas.job import RateLimit
from workers.limiter import MARGIN, Limiter


def test_requests_per_second_never_exceeded():
    limiter = Limiter(RateLimit(requests_per_s=20))
    sent: list[float] = []

    async def one():
        handle = await limiter.acquire(10)
        sent.append(time.monotonic())
        await limiter.settle(handle, 10)

    async def go():
        await asyncio.gather(*(one() for _ in range(50)))

    asyncio.run(go())
    assert len(sent) == 50
    assert max_in_window(sent, 1.0) == 20  # reaches the limit, never passes it
    assert sent[-1] - sent[0] >= 2.0  # 50 requests at 20/s need more than two windows


def test_token_reservations_are_settled_to_what_was_used():
    limiter = Limiter(RateLimit(tokens_per_min=100))

    async def go():
        first = await limiter.acquire(60)
        await limiter.settle(first, 10)  # the answer used 10 of the 60 reserved
        start = time.monotonic()
        await limiter.acquire(60)  # 10 + 60 <= 100: no wait
        assert time.monotonic() - start < 0.5
        return limiter.tokens.used

    assert asyncio.run(go()) == 70


def test_a_request_over_the_token_limit_waits_for_the_window(monkeypatch):
    limiter = Limiter(RateLimit(tokens_per_min=100))
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    slept: list[float] = []

    async def fake_sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)

    async def go():
        await limiter.acquire(80)
        await limiter.acquire(80)  # must wait until the first leaves the (padded) window

    asyncio.run(go())
    assert slept and abs(sum(slept) - 60 * MARGIN) < 1e-6
