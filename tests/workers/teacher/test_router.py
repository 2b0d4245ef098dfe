"""Router: fewest in flight under a cap, circuit breaker with health checks, endpoint changes,
endpoint-wide 429 pauses and the outage deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from workers.errors import TeacherOutage
from workers.teacher.router import Router


def run(coro):
    return asyncio.run(coro)


def open_circuits(router: Router) -> set[str]:
    return {d.endpoint for d in router.down() if d.state == "circuit open"}


def test_fewest_in_flight_under_a_cap():
    async def go():
        router = Router(["a", "b"], cap_per_endpoint=2)
        held, order = [], []
        for _ in range(4):
            cm = router.acquire()
            order.append(await cm.__aenter__())
            held.append(cm)
        assert sorted(order) == ["a", "a", "b", "b"]
        waiter = asyncio.create_task(router.acquire().__aenter__())
        await asyncio.sleep(0.05)
        assert not waiter.done()  # both endpoints at their cap
        await held[0].__aexit__(None, None, None)
        assert await asyncio.wait_for(waiter, 1) == order[0]

    run(go())


def test_a_batch_holds_a_slot_per_sequence_and_frees_them_all():
    async def go():
        router = Router(["a"], cap_per_endpoint=4)
        one, batch = router.acquire(), router.acquire(4)
        await one.__aenter__()
        entering = asyncio.create_task(batch.__aenter__())
        await asyncio.sleep(0.05)
        assert not entering.done()  # 1 + 4 > 4: the batch waits for the single request
        await one.__aexit__(None, None, None)
        await asyncio.wait_for(entering, 1)
        assert router.in_flight_total() == 4
        singles = [router.acquire() for _ in range(3)]
        waiting = [asyncio.create_task(cm.__aenter__()) for cm in singles]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in waiting)  # the batch holds every slot
        await batch.__aexit__(None, None, None)  # frees four slots: all three get in
        await asyncio.wait_for(asyncio.gather(*waiting), 1)
        assert router.in_flight_total() == 3

        big = Router(["b"], cap_per_endpoint=2)
        async with big.acquire(8) as url:  # above the cap: it goes once the endpoint is idle
            assert url == "b" and big.in_flight_total() == 8

    run(go())


def test_a_raised_cap_lets_waiting_requests_in_at_once():
    async def go():
        router = Router(["a"], cap_per_endpoint=1)
        held = router.acquire()
        await held.__aenter__()
        second = router.acquire()
        waiter = asyncio.create_task(second.__aenter__())
        await asyncio.sleep(0.05)
        assert not waiter.done()  # at the cap
        await router.set_cap(2)  # another worker went idle: its share comes here
        assert await asyncio.wait_for(waiter, 1) == "a"
        assert router.in_flight_total() == 2
        await second.__aexit__(None, None, None)

    run(go())


def test_failing_endpoint_is_taken_out_until_healthy():
    async def go():
        health = {"a": False}
        checks = []

        async def check(endpoint):
            checks.append(endpoint)
            return health[endpoint]

        router = Router(["a", "b"], 8, health_check=check, failure_threshold=3, cooldown_s=0.05)
        at_fault = [await router.report("a", ok=False, reason="ConnectError") for _ in range(3)]
        assert at_fault == [False, False, True]  # the third failure opens the circuit
        assert open_circuits(router) == {"a"} and router.circuit_opened == 1
        assert router.down()[0].reason == "ConnectError"
        for _ in range(5):
            async with router.acquire() as endpoint:
                assert endpoint == "b"
        await asyncio.sleep(0.2)
        assert open_circuits(router) == {"a"} and checks  # probed, still unhealthy
        health["a"] = True
        await asyncio.sleep(0.2)
        assert open_circuits(router) == set()
        async with router.acquire() as endpoint:
            assert endpoint == "a"  # it has served least

    run(go())


def test_success_resets_the_failure_count():
    async def go():
        router = Router(["a"], 1, failure_threshold=3)
        for ok in (False, False, True, False, False):
            await router.report("a", ok=ok)
        assert open_circuits(router) == set()

    run(go())


def test_endpoints_can_change_while_requests_wait():
    async def go():
        router = Router(["old"], 1)
        async with router.acquire():
            waiter = asyncio.create_task(router.acquire().__aenter__())
            await asyncio.sleep(0.02)
            await router.set_endpoints(["new"])  # the replica came back on another port
            assert await asyncio.wait_for(waiter, 1) == "new"
        assert router.endpoints == ["new"]

    run(go())


def test_a_429_pauses_the_endpoint_for_every_request_and_tells_the_other_workers():
    async def go():
        told: list[tuple[str, float]] = []
        router = Router(["a", "b"], 8, on_pause=lambda e, until: told.append((e, until)))
        before = time.time()
        await router.pause("a", 0.3)
        assert told and told[0][0] == "a" and told[0][1] >= before + 0.3
        for _ in range(4):  # every request goes to b while a is paused
            async with router.acquire() as endpoint:
                assert endpoint == "b"
        assert [d.state for d in router.down()] == ["paused (429)"]
        await router.pause("b", 0.3)
        async with router.acquire() as endpoint:  # both paused: waits for the first to end
            assert time.time() >= told[0][1] and endpoint in ("a", "b")
        return router

    router = run(go())
    assert router.outage_since is not None  # both were paused at once: an outage began


def test_a_peer_pause_keeps_requests_away_until_its_wall_clock_time():
    async def go():
        router = Router(["a"], 8)
        until = time.time() + 0.3
        await router.pause_until("a", until)
        await router.pause_until("a", until - 0.2)  # an older, shorter pause changes nothing
        async with router.acquire():
            assert time.time() >= until

    run(go())


def test_a_429_without_retry_after_backs_off_more_each_time():
    async def go():
        told: list[float] = []
        router = Router(["a"], 8, pause_backoff=(0.1, 0.3), on_pause=lambda e, u: told.append(u))
        for _ in range(4):
            now = time.time()
            await router.pause("a", None)
            told[-1] -= now
        return told

    waits = run(go())
    assert [round(w, 1) for w in waits] == [0.1, 0.2, 0.3, 0.3]


def test_a_429_with_retry_after_zero_still_backs_off():
    async def go():
        told: list[float] = []
        router = Router(["a"], 8, pause_backoff=(0.1, 0.3), on_pause=lambda e, u: told.append(u))
        now = time.time()
        await router.pause("a", 0.0)
        return told[0] - now, [d.state for d in router.down()]

    wait, states = run(go())
    assert round(wait, 1) == 0.1 and states == ["paused (429)"]


def test_no_usable_endpoint_for_the_outage_timeout_stops_waiting_requests():
    async def go():
        async def never(endpoint):
            return False

        router = Router(["a"], 8, health_check=never, failure_threshold=1, cooldown_s=0.05,
                        outage_timeout_s=0.3)  # fmt: skip
        await router.report("a", ok=False, reason="ConnectError")
        waiters = [asyncio.create_task(router.acquire().__aenter__()) for _ in range(3)]
        results = await asyncio.gather(*waiters, return_exceptions=True)
        await router.aclose()
        return results

    results = run(go())
    assert all(isinstance(r, TeacherOutage) for r in results)
    assert "a circuit open since" in str(results[0]) and "ConnectError" in str(results[0])
    assert "teacher.outage_timeout_s" in str(results[0])


def test_an_outage_ends_with_a_success_not_with_a_health_check():
    async def go():
        async def healthy(endpoint):
            return True

        router = Router(["a"], 8, health_check=healthy, failure_threshold=1, cooldown_s=0.05,
                        outage_timeout_s=30)  # fmt: skip
        await router.report("a", ok=False)
        started = router.outage_since
        assert started is not None
        async with router.acquire():  # the health check closed the circuit
            pass
        assert router.outage_since == started  # answered /health, but no answer yet
        await router.report("a", ok=True)
        assert router.outage_since is None
        await router.aclose()

    run(go())


def test_waiting_for_a_slot_is_not_an_outage():
    async def go():
        router = Router(["a"], 1, outage_timeout_s=0.05)
        async with router.acquire():
            waiter = asyncio.create_task(router.acquire().__aenter__())
            await asyncio.sleep(0.2)
            assert not waiter.done() and router.outage_since is None
        assert await asyncio.wait_for(waiter, 1) == "a"

    run(go())


@pytest.mark.parametrize("gone", [True, False])
def test_reports_for_removed_endpoints_are_ignored(gone):
    async def go():
        router = Router(["a", "b"], 1, failure_threshold=1)
        if gone:
            await router.set_endpoints(["b"])
        return await router.report("a", ok=False)

    assert run(go()) is (not gone)


def test_a_pause_wakes_its_waiters_even_when_the_loop_timer_fires_early():
    """Loop timers may fire before the router's clock has reached a pause's end (uvloop counts
    whole milliseconds); a waiter woken early must still be woken again. A router clock that
    runs slower than the loop's makes every timer early: the request must still go out."""
    start = time.monotonic()

    def slow_clock() -> float:
        return start + (time.monotonic() - start) * 0.8

    async def go():
        router = Router(["a"], 8, clock=slow_clock)
        await router.pause("a", 0.2)
        cm = router.acquire()
        endpoint = await asyncio.wait_for(cm.__aenter__(), 5)
        await cm.__aexit__(None, None, None)
        await router.aclose()
        return endpoint

    assert run(go()) == "a"
