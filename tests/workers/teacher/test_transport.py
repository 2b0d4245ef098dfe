"""The optional aiohttp transport behind the client (teacher.transport: aiohttp), over real
sockets: answers equal httpx's, and each injected fault ends as the same kind of outcome."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter

import aiohttp
import httpx
import pytest
from fault_teacher_server import FaultPlan, FaultTeacherServer
from samples import same
from test_fault_teacher_server import ALL_FAULTS_BUT_STALL, make_spec, rows

from schemas.wire import Completion, PromptRow
from workers import USER_AGENT
from workers.errors import HarvestError, TeacherUnavailable
from workers.teacher.client import TeacherClient
from workers.teacher.transport import AiohttpTransport, HttpxTransport


async def _harvest(url: str, transport: str) -> list[Completion | BaseException]:
    client = TeacherClient(make_spec(url, transport=transport), job_id="t")
    try:
        return await asyncio.gather(*(client.complete(r) for r in rows(12)), return_exceptions=True)
    finally:
        await client.aclose()


def test_aiohttp_transport_gives_httpx_answers_through_faults() -> None:
    with FaultTeacherServer(plan=ALL_FAULTS_BUT_STALL) as server:
        got = asyncio.run(_harvest(server.url, "aiohttp"))
    with FaultTeacherServer(plan=FaultPlan()) as server:
        ref = asyncio.run(_harvest(server.url, "httpx"))
    assert all(isinstance(c, Completion) for c in got), got
    for a, b in zip(got, ref, strict=True):
        assert isinstance(a, Completion) and isinstance(b, Completion)
        assert len(a.samples) == len(b.samples) and a.prompt_token_ids == b.prompt_token_ids
        assert all(same(x, y) for x, y in zip(a.samples, b.samples, strict=True))
    assert any(c.attempts > 1 for c in got if isinstance(c, Completion))


def test_client_picks_the_transport_from_the_spec() -> None:
    async def go() -> None:
        default = TeacherClient(make_spec("http://127.0.0.1:9/v1"), job_id="t")
        assert isinstance(default._transport, AiohttpTransport)  # POSTs and health on aiohttp
        await default.aclose()
        client = TeacherClient(make_spec("http://127.0.0.1:9/v1", transport="httpx"), job_id="t")
        assert isinstance(client._transport, HttpxTransport)
        await client.aclose()

    asyncio.run(go())


def test_both_transports_send_the_same_identity() -> None:
    """The direct aiohttp POST carries the User-Agent, job id and key that httpx sends."""

    async def send(url: str, transport: str) -> None:
        spec = make_spec(url, transport=transport)
        client = TeacherClient(spec, job_id="job-7", api_key="k-1")
        try:
            await client.complete(rows(2)[1])
        finally:
            await client.aclose()

    seen = {}
    for transport in ("httpx", "aiohttp"):
        with FaultTeacherServer(plan=FaultPlan()) as server:
            asyncio.run(send(server.url, transport))
            log = [r for r in server.log if r.path.endswith("/completions")]
        assert len(log) == 1
        seen[transport] = (log[0].user_agent, log[0].job_id, log[0].authorization)
    assert seen["aiohttp"] == seen["httpx"]
    assert seen["httpx"][0] == USER_AGENT and seen["httpx"][1:] == ("job-7", "Bearer k-1")


def test_an_answer_received_while_the_loop_stalled_is_not_sent_again() -> None:
    """A stalled event loop (a CPU-starved worker) past the deadline must not turn a received
    answer into a timeout and a second request: an always-400 prompt reaches the server once.

    The loop is blocked from a timer a few ms after each request leaves, longer than
    ``timeout_s``; the server (its own thread) answers meanwhile. Before the fix, some of these
    rows timed out with their 400 in the socket and were sent again."""
    keys = [f"bad-{i}" for i in range(30)]

    async def go(server: FaultTeacherServer) -> None:
        spec = make_spec(server.url, timeout_s=0.3, max_attempts=4)
        client = TeacherClient(spec, job_id="t")
        loop = asyncio.get_running_loop()
        try:
            await client.complete(rows(2)[1])  # a kept-alive connection
            for i, key in enumerate(keys):
                task = asyncio.create_task(client.complete(PromptRow(key, "x", prompt=key)))
                loop.call_later(0.001 + i * 0.0005, time.sleep, 0.5)  # the stall
                with contextlib.suppress(HarvestError):
                    await task
        finally:
            await client.aclose()

    with FaultTeacherServer(plan=FaultPlan(always_400=set(keys))) as server:
        asyncio.run(go(server))
        sent = Counter(r.key for r in server.log if r.key in keys)
    assert set(sent) == set(keys)
    assert max(sent.values()) == 1, sent


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_each_transport_maps_its_own_failures_straight_to_harvest_errors(transport: str) -> None:
    """A refused connection is a TeacherUnavailable caused by the library's own exception (no
    detour through the other library's classes), for a POST and for a health check."""

    async def go() -> tuple[BaseException, bool]:
        with socket.socket() as free:  # a port nothing listens on
            free.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{free.getsockname()[1]}/v1"
        client = TeacherClient(make_spec(url, transport=transport, max_attempts=1), job_id="t")
        try:
            try:
                await client._send(url, url + "/completions", b"{}", 1 << 20)
            except TeacherUnavailable as err:
                return err, await client.healthy(url)
            raise AssertionError("no error")
        finally:
            await client.aclose()

    err, healthy = asyncio.run(go())
    assert err.endpoint and not healthy
    library = aiohttp if transport == "aiohttp" else httpx
    assert type(err.__cause__).__module__.split(".")[0] == library.__name__, err.__cause__
