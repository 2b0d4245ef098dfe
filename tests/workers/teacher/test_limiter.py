"""Rate limits: no sliding window ever holds more than the limit.

The limiter runs on a virtual clock (its ``clock`` and ``sleep`` are injected), so every count
below is exact and independent of how busy the machine is.
"""

from __future__ import annotations

import asyncio

from windows import max_in_window

from schemas.teacher import RateLimit
from workers.teacher.limiter import MARGIN, Limiter, SlidingWindow


class VirtualClock:
    """``now`` only moves when someone sleeps: sleeping is instant and exact."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def limiter(clock: VirtualClock, **limits) -> Limiter:
    return Limiter(RateLimit(**limits), clock=clock, sleep=clock.sleep)


def test_requests_per_second_never_exceeded():
    clock = VirtualClock()
    lim = limiter(clock, requests_per_s=20)
    sent: list[float] = []

    async def one():
        handle = await lim.acquire(10)
        sent.append(clock())
        await lim.settle(handle, 10)

    async def go():
        await asyncio.gather(*(one() for _ in range(50)))

    asyncio.run(go())
    assert len(sent) == 50
    assert max_in_window(sent, 1.0 * MARGIN) == 20  # reaches the limit, never passes it
    assert sent == sorted(sent)  # arrival order is kept
    # 50 requests at 20 per (padded) second: the 21st and 41st each wait one whole window.
    assert abs(sent[-1] - sent[0] - 2 * MARGIN) < 1e-9


def test_token_reservations_are_settled_to_what_was_used():
    clock = VirtualClock()
    lim = limiter(clock, tokens_per_min=100)

    async def go():
        first = await lim.acquire(60)
        await lim.settle(first, 10)  # the answer used 10 of the 60 reserved
        await lim.acquire(60)  # 10 + 60 <= 100: no wait
        return lim.tokens.used

    assert asyncio.run(go()) == 70
    assert clock.slept == []


def test_a_request_over_the_token_limit_waits_for_the_window():
    clock = VirtualClock()
    lim = limiter(clock, tokens_per_min=100)

    async def go():
        await lim.acquire(80)
        await lim.acquire(80)  # must wait until the first leaves the (padded) window

    asyncio.run(go())
    assert clock.slept and abs(sum(clock.slept) - 60 * MARGIN) < 1e-9


def test_settling_after_the_window_moved_on_gives_nothing_back():
    """A long request's reservation leaves the window before its answer arrives; settling it
    then must not subtract from the requests now in the window (the count went negative and
    let too much through)."""
    window = SlidingWindow(limit=100, window_s=60)
    long_request = window.take(80, now=0.0)
    assert window.wait_for(80, now=61.0) == 0.0  # the long request's 80 left the window
    window.take(80, now=61.0)  # a second request fills the window to 80
    window.give_back(long_request, keep=5)  # the long answer used 5 of its 80 tokens
    assert window.used == 80  # not 80 - 75
    assert window.wait_for(80, now=62.0) > 0  # 80 + 80 > 100: the third must wait


def test_limiter_never_lets_more_than_the_limit_into_a_window_with_late_settles():
    clock = VirtualClock()
    lim = limiter(clock, tokens_per_min=100)

    async def go():
        slow = await lim.acquire(90)
        clock.now += 70  # longer than the padded window: the reservation has left it
        fast = await lim.acquire(90)
        await lim.settle(slow, 1)
        await lim.acquire(90)  # would fit at once if the late settle gave 89 back
        await lim.settle(fast, 90)

    asyncio.run(go())
    assert clock.slept and abs(sum(clock.slept) - 60 * MARGIN) < 1e-9
