"""The router's outage deadline on a virtual clock: every way an endpoint leaves rotation arms it.

Each test drives the router's clock and sleeps from one ``VirtualClock``: a waiting request
must raise ``TeacherOutage`` exactly when ``outage_timeout_s`` has passed since the trouble
began (never before, never never), or go on when the teacher answers again in time. The first
test is the hang seen in a real run: a graceful shutdown refuses new connections, the circuit
opens, then answers to requests sent earlier arrive and used to stop the outage clock for good.
"""

from __future__ import annotations

import asyncio

import pytest
from virtual_clock import VirtualClock

from workers.errors import TeacherOutage
from workers.teacher.router import Router

TIMEOUT = 30.0
THRESHOLD = 3


class Teacher:
    """What the probe sees: /health answers while ``up``."""

    def __init__(self) -> None:
        self.up = False

    async def health(self, endpoint: str) -> bool:
        return self.up


def router(clock: VirtualClock, teacher: Teacher, endpoints: tuple[str, ...] = ("a",)) -> Router:
    return Router(
        list(endpoints), 8, health_check=teacher.health, failure_threshold=THRESHOLD,
        cooldown_s=2.0, outage_timeout_s=TIMEOUT, clock=clock, sleep=clock.sleep,
    )  # fmt: skip


async def fail(r: Router, endpoint: str = "a", times: int = THRESHOLD) -> None:
    for _ in range(times):
        await r.report(endpoint, ok=False, reason="TeacherUnavailable")


def waiter(r: Router) -> asyncio.Task[str]:
    return asyncio.create_task(r.acquire().__aenter__())


async def outage_at(clock: VirtualClock, task: asyncio.Task[str], start: float) -> None:
    """``task`` waits until ``start + TIMEOUT`` and raises ``TeacherOutage`` right then."""
    await clock.advance(start + TIMEOUT - clock() - 0.01)
    assert not task.done(), "gave up before the outage deadline"
    await clock.advance(0.02)
    assert task.done(), "no outage stop at the deadline"
    with pytest.raises(TeacherOutage, match=r"teacher\.outage_timeout_s"):
        task.result()


def go(test):
    async def main():
        clock, teacher = VirtualClock(), Teacher()
        await test(clock, teacher)

    asyncio.run(main())


def test_stale_answers_after_the_circuit_opened_do_not_stop_the_outage_clock():
    async def test(clock, teacher):
        r = router(clock, teacher)
        t0 = clock()
        await fail(r)
        for _ in range(4):  # answers to requests on the wire when the server began to shut down
            assert await r.report("a", ok=True) is False
        assert r.outage_since == t0
        assert [(d.state, d.reason) for d in r.down()] == [("circuit open", "TeacherUnavailable")]
        await outage_at(clock, waiter(r), t0)
        await r.aclose()

    go(test)


def test_a_stale_row_error_after_the_circuit_opened_does_not_stop_it_either():
    async def test(clock, teacher):
        r = router(clock, teacher)
        await clock.advance(1)
        t0 = clock()
        await fail(r)
        await r.report("a", ok=True, reason="BadRequest")  # the row's fault
        await outage_at(clock, waiter(r), t0)
        await r.aclose()

    go(test)


def test_the_clock_starts_at_the_first_failure_not_the_one_that_opened_the_circuit():
    async def test(clock, teacher):
        r = router(clock, teacher)
        t0 = clock()
        for _ in range(THRESHOLD):  # one row alone, backing off between its attempts
            await fail(r, times=1)
            await clock.advance(4)
        assert r.outage_since == t0
        await outage_at(clock, waiter(r), t0)
        await r.aclose()

    go(test)


def test_a_request_arriving_after_the_deadline_gives_up_at_once():
    async def test(clock, teacher):
        r = router(clock, teacher)
        t0 = clock()
        await fail(r)  # no request was waiting: units between rows, or none in flight
        await clock.advance(TIMEOUT + 5)
        late = waiter(r)
        await clock.settle()
        assert late.done() and isinstance(late.exception(), TeacherOutage)
        assert r.outage_since == t0
        await r.aclose()

    go(test)


def test_health_answering_while_requests_still_fail_does_not_restart_the_clock():
    async def test(clock, teacher):
        r = router(clock, teacher)
        t0 = clock()
        await fail(r)
        teacher.up = True  # /health answers, completions do not
        await clock.advance(2.5)
        assert r.down() == [] and r.outage_since == t0  # closed by the probe, no answer yet
        teacher.up = False
        await fail(r)
        assert [d.state for d in r.down()] == ["circuit open"]
        await outage_at(clock, waiter(r), t0)
        await r.aclose()

    go(test)


def test_the_teacher_back_before_the_deadline_lets_waiting_requests_go_on():
    async def test(clock, teacher):
        r = router(clock, teacher)
        await fail(r)
        task = waiter(r)
        await clock.advance(TIMEOUT / 2)
        teacher.up = True
        await clock.advance(2.5)  # the next probe closes the circuit
        assert task.done() and task.result() == "a"
        await r.report("a", ok=True)  # its answer: the outage is over
        assert r.outage_since is None
        await clock.advance(TIMEOUT)
        async with r.acquire() as endpoint:
            assert endpoint == "a"
        await r.aclose()

    go(test)


def test_a_fresh_answer_from_another_endpoint_ends_the_outage():
    async def test(clock, teacher):
        r = router(clock, teacher, ("a", "b"))
        await fail(r, "a")
        assert r.outage_since is None  # b is still usable
        await clock.advance(1)
        await fail(r, "b")
        assert r.outage_since == clock()  # since the last usable endpoint's trouble began
        await r.report("b", ok=True)  # sent before b went out: changes nothing
        assert r.outage_since is not None
        await r.aclose()

    go(test)


def test_a_429_longer_than_the_outage_timeout_stops_the_waiting_requests():
    async def test(clock, teacher):
        r = router(clock, teacher)
        t0 = clock()
        # Peers pass pauses as wall-clock times; the router keeps them on its own clock.
        await r.pause("a", TIMEOUT * 3)
        assert r.outage_since == t0 and [d.state for d in r.down()] == ["paused (429)"]
        await outage_at(clock, waiter(r), t0)
        await r.aclose()

    go(test)


def test_losing_the_last_usable_endpoint_from_the_set_arms_the_deadline():
    async def test(clock, teacher):
        r = router(clock, teacher, ("a", "b"))
        await fail(r, "b")
        t0 = clock()
        assert r.outage_since is None
        await r.set_endpoints(["b"])  # a's replica went away; b is open
        assert r.outage_since is not None
        await outage_at(clock, waiter(r), t0)
        await r.aclose()

    go(test)


def test_an_endpoint_added_during_an_outage_serves_and_its_answer_ends_it():
    async def test(clock, teacher):
        r = router(clock, teacher)
        await fail(r)
        task = waiter(r)
        await clock.advance(5)
        await r.set_endpoints(["a", "new"])  # a restarted replica on a new port
        await clock.settle()
        assert task.done() and task.result() == "new"
        await r.report("new", ok=True)
        assert r.outage_since is None
        await r.aclose()

    go(test)
