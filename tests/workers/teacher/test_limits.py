"""An answer's body is read up to a bound the request allows, never whole: a server that sends
an endless body costs a retry and then a failure, not a worker's memory."""

from __future__ import annotations

import asyncio

import pytest
from fault_teacher_server import FaultPlan, FaultTeacherServer
from test_fault_teacher_server import make_spec

from schemas.requests import CompletionRequest
from schemas.wire import Completion, PromptRow
from workers.errors import InvalidResponse
from workers.teacher.client import TeacherClient
from workers.teacher.limits import OVERHEAD_BYTES, completion_limit, tokenize_limit

SLACK = 32 << 20  # socket buffers on both ends of a loopback connection, and aiohttp's


def _request(mode: str = "generate", **kw: int) -> CompletionRequest:
    fields = {"max_tokens": 16, "n": 1, "k": 5} | kw
    return CompletionRequest(mode=mode, model="m", temperature=1.0, sampling={}, **fields)


def test_the_bound_scales_with_what_the_request_asks_for() -> None:
    one = completion_limit(_request(), 100)
    assert completion_limit(_request(n=4), 100) > 3 * (one - OVERHEAD_BYTES)
    assert completion_limit(_request(max_tokens=160), 100) > one
    assert completion_limit(_request(k=50), 100) > one
    assert completion_limit(_request(), 10_000) > one  # the prompt's ids are echoed back
    score = _request("score", max_tokens=1, k=20)
    # Score mode: every prompt token has K + 1 entries, so the bound grows with the prompt.
    assert completion_limit(score, 20_000) - completion_limit(score, 10_000) >= 10_000 * 21 * 100
    assert tokenize_limit(1000) > tokenize_limit(10)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_an_endless_body_is_cut_off_and_ends_as_invalid_response(transport: str) -> None:
    rows = [PromptRow(f"p{i}", f"x:{i}", prompt=f"endless {i}") for i in range(3)]
    rows.append(PromptRow("ok", "x:3", prompt="fine"))
    plan = FaultPlan(always_endless={r.prompt for r in rows[:3]})
    spec = make_spec("http://unused/v1", transport=transport, timeout_s=60.0, max_attempts=2)

    async def go(url: str) -> list[Completion | BaseException]:
        client = TeacherClient(spec, job_id="t", endpoints=[url])
        try:
            return await asyncio.gather(*(client.complete(r) for r in rows), return_exceptions=True)
        finally:
            await client.aclose()

    with FaultTeacherServer(model="fault", plan=plan) as server:
        got = asyncio.run(go(server.url))
        endless = [r for r in server.log if r.outcome == "endless"]
    assert isinstance(got[3], Completion)
    for err in got[:3]:
        assert type(err) is InvalidResponse and err.attempts == 2, err
        assert "past the" in str(err) and err.endpoint
    assert len(endless) == 3 * 2  # every attempt was sent, and each was cut off
    limit = completion_limit(_request(max_tokens=4, n=2, k=3), 1000)
    for rec in endless:
        assert 0 < rec.sent <= limit + SLACK, rec.sent  # not read to the 60 s timeout
        assert rec.rss is not None and rec.rss[1] - rec.rss[0] < 2 * SLACK, rec.rss
