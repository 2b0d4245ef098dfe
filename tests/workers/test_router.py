"""Router: fewest in flight under a cap, circuit breaker with health checks, endpoint changes."""

from __future__ import annotations

import asyncio

from workers.router import Router


def run(coro):
    return asyncio.run(coro)


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


def test_failing_endpoint_is_taken_out_until_healthy():
    async def go():
        health = {"a": False}
        checks = []

        async def check(endpoint):
            checks.append(endpoint)
            return health[endpoint]

        router = Router(["a", "b"], 8, health_check=check, failure_threshold=3, cooldown_s=0.05)
        for _ in range(3):
            await router.report("a", ok=False)
        assert router.open == {"a"} and router.circuit_opened == 1
        for _ in range(5):
            async with router.acquire() as endpoint:
                assert endpoint == "b"
        await asyncio.sleep(0.2)
        assert "a" in router.open and checks  # probed, still unhealthy
        health["a"] = True
        await asyncio.sleep(0.2)
        assert router.open == set() and router.failures["a"] == 0
        async with router.acquire() as endpoint:
            assert endpoint == "a"  # it has served least

    run(go())


def test_success_resets_the_failure_count():
    async def go():
        router = Router(["a"], 1, failure_threshold=3)
        for ok in (False, False, True, False, False):
            await router.report("a", ok=ok)
        assert router.open == set()

    run(go())


def test_endpoints_can_change_while_requests_wait():
    async def go():
        router = Router(["old"], 1)
        async with router.acquire():
            waiter = asyncio.create_task(router.acquire().__aenter__())
            await asyncio.sleep(0.02)
            await router.set_endpoints(["new"])  # the replica came back on another port
            assert await asyncio.wait_for(waiter, 1) == "new"
        assert router.endpoints == ["new"] and router.in_flight["old"] == 0

    run(go())
