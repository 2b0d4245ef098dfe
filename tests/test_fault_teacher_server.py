"""The fault-injecting teacher over real sockets: each fault as a client sees it, determinism,
recovery after two attempts, Retry-After timing, capacity, and a clean shutdown."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import threading
import time
from collections import Counter
from typing import Any

import httpx
import orjson
import pytest
from fake_teacher import FakeTeacher, decode_prompt, encode_text
from fault_plan import check_attempts
from fault_teacher_server import FAULTS, FaultPlan, FaultTeacherServer, Record

from schemas.job import JobSpec, parse_job
from schemas.wire import Completion, PromptRow
from workers import USER_AGENT
from workers.answers.parse import parse_completions
from workers.errors import InvalidResponse
from workers.teacher.client import TeacherClient
from workers.teacher.retry import parse_retry_after

ALL_FAULTS_BUT_STALL = FaultPlan(
    rate_429=0.2, rate_500=0.2, rate_503=0.2, rate_reset=0.2, rate_truncated=0.2, seed=7
)


def body(prompt: str, model: str = "fault") -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": 3, "logprobs": 2}


def make_spec(url: str, **teacher: Any) -> JobSpec:
    return parse_job(
        {
            "input": "x.jsonl",
            "teacher": {
                "model": "fault",
                "endpoints": [url],
                "authorization": {"owner": "us", "license": "apache-2.0", "attestation": "t"},
                "timeout_s": 1.0,
                "backoff_initial_s": 0.01,
                "backoff_max_s": 0.05,
                "max_attempts": 4,
                **teacher,
            },
            "sampling": {"max_tokens": 4, "n": 2, "logprobs": 3, "seed": 3},
            "concurrency": {"in_flight_per_endpoint": 16},
        }
    )


def rows(count: int) -> list[PromptRow]:
    """Half completions, half chat."""
    return [
        PromptRow(f"p{i}", f"x.jsonl:{i}", prompt=f"prompt {i}")
        if i % 2
        else PromptRow(f"p{i}", f"x.jsonl:{i}", messages=[{"role": "user", "content": f"chat {i}"}])
        for i in range(count)
    ]


def key_of(row: PromptRow) -> str:
    return row.prompt if row.messages is None else row.messages[-1]["content"]


async def complete_all(spec: JobSpec, batch: list[PromptRow]) -> list[Completion]:
    client = TeacherClient(spec, job_id="job-f", api_key="sekrit")
    try:
        return await asyncio.gather(*(client.complete(r) for r in batch))
    finally:
        await client.aclose()


def post_attempts(server: FaultTeacherServer, keys: list[str], attempts: int) -> list[str]:
    """Each key `attempts` times in order, over one keep-alive client; returns outcome names."""
    with httpx.Client(timeout=2.0) as http:
        for _ in range(attempts):
            for key in keys:
                try:
                    http.post(f"{server.url}/completions", json=body(key))
                except httpx.TransportError:
                    pass
    return [r.outcome for r in server.log]


def test_models_health_and_unknown_model() -> None:
    with FaultTeacherServer(model="fault") as server:
        models = httpx.get(f"{server.url}/models").json()
        assert models["data"] == [{"id": "fault", "root": "/fault"}]
        assert httpx.get(server.url.removesuffix("/v1") + "/health").status_code == 200
        resp = httpx.post(f"{server.url}/completions", json=body("hi", model="other"))
        assert resp.status_code == 404
        assert resp.json()["error"]["type"] == "NotFoundError"
        assert resp.json()["error"]["code"] == 404
        assert [r.outcome for r in server.log] == ["ok", "ok", "404"]


@pytest.mark.parametrize("http_date", [False, True], ids=["delta", "http-date"])
def test_429_sends_retry_after(http_date: bool) -> None:
    plan = FaultPlan(rate_429=1.0, retry_after_s=2.0, retry_after_http_date=http_date)
    with FaultTeacherServer(plan=plan) as server:
        resp = httpx.post(f"{server.url}/completions", json=body("hi"))
        (rec,) = server.log
    assert resp.status_code == 429 and resp.json()["error"]["code"] == 429
    value = resp.headers["retry-after"]
    assert rec.retry_after == value
    if http_date:
        when = email.utils.parsedate_to_datetime(value).timestamp()
        assert rec.wall + 2.0 <= when < rec.wall + 3.0  # rounded up to a whole second
        assert value.endswith(" GMT")
    else:
        assert value == "2"
        assert parse_retry_after(value) == 2.0


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors(status: int) -> None:
    with FaultTeacherServer(plan=FaultPlan(**{f"rate_{status}": 1.0})) as server:
        resp = httpx.post(f"{server.url}/completions", json=body("hi"))
    assert resp.status_code == status and resp.json()["error"]["code"] == status
    assert "retry-after" not in resp.headers


def test_reset_is_a_transport_error_then_recovers() -> None:
    with FaultTeacherServer(plan=FaultPlan(rate_reset=1.0)) as server, httpx.Client() as http:
        for _ in range(2):
            with pytest.raises(httpx.TransportError) as info:
                http.post(f"{server.url}/completions", json=body("hi"))
            assert not isinstance(info.value, httpx.TimeoutException)
        assert http.post(f"{server.url}/completions", json=body("hi")).status_code == 200
        assert [(r.attempt, r.outcome) for r in server.log] == [
            (1, "reset"),
            (2, "reset"),
            (3, "ok"),
        ]


def test_stall_times_out_and_shutdown_does_not_wait_for_it() -> None:
    server = FaultTeacherServer(plan=FaultPlan(rate_stall=1.0, stall_s=30.0)).start()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/completions", json=body("hi"), timeout=0.2)
    pending = socket.create_connection(("127.0.0.1", server.port))  # a second stall, left open
    raw = orjson.dumps(body("other"))
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(raw)}\r\n\r\n"
    pending.sendall(head.encode() + raw)
    deadline = time.monotonic() + 5
    while len(server.log) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2.0
    assert pending.recv(100) == b""  # closed without an answer
    pending.close()
    assert not any(t.name == "fault-teacher" for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    assert [r.outcome for r in server.log] == ["stall", "stall"]


def test_truncated_is_a_complete_200_with_cut_json() -> None:
    with FaultTeacherServer(plan=FaultPlan(rate_truncated=1.0)) as server:
        resp = httpx.post(f"{server.url}/completions", json=body("hi"))
    assert resp.status_code == 200
    assert int(resp.headers["content-length"]) == len(resp.content) > 10
    assert (
        resp.content.startswith(b'{"object":"text_completion"') and b'"choices":[' in resp.content
    )
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(resp.content)


def chat_ids(server: FaultTeacherServer, text: str, http: httpx.Client) -> list[int]:
    """A one-turn conversation as the server's own template renders it (vLLM's /tokenize)."""
    messages = [{"role": "user", "content": text}]
    req = {"model": "fault", "messages": messages, "add_generation_prompt": True}
    resp = http.post(server.url.removesuffix("/v1") + "/tokenize", json=req)
    assert resp.status_code == 200
    return resp.json()["tokens"]


def test_always_400_on_every_attempt_for_prompts_and_chat() -> None:
    plan = FaultPlan(always_400={"bad", "bad chat"}, rate_500=1.0)
    with FaultTeacherServer(plan=plan) as server, httpx.Client() as http:
        chat = body("")
        chat["prompt"] = chat_ids(server, "bad chat", http)
        for _ in range(5):
            resp = http.post(f"{server.url}/completions", json=body("bad"))
            assert resp.status_code == 400 and resp.json()["error"]["type"] == "BadRequestError"
            assert http.post(f"{server.url}/completions", json=chat).status_code == 400
        recs = [r for r in server.by_key()["bad chat"] if r.path == "/v1/completions"]
        assert [r.attempt for r in recs] == [1, 2, 3, 4, 5]
        assert {r.outcome for r in server.log if r.path == "/v1/completions"} == {"400"}


def test_deterministic_and_never_faulted_after_two_attempts() -> None:
    keys = [f"k{i}" for i in range(40)]
    runs = []
    for plan in (ALL_FAULTS_BUT_STALL, ALL_FAULTS_BUT_STALL, FaultPlan(rate_500=0.5, seed=1)):
        with FaultTeacherServer(plan=plan) as server:
            runs.append(post_attempts(server, keys, attempts=4))
            log = server.log
        assert all(r.outcome == "ok" for r in log if r.attempt >= 3)
    assert runs[0] == runs[1]
    assert set(runs[0][: 2 * len(keys)]) == {"429", "500", "503", "reset", "truncated"}
    assert 0 < runs[2].count("500") < 2 * len(keys)


def test_set_plan_while_running() -> None:
    with FaultTeacherServer(plan=FaultPlan(rate_503=1.0)) as server:
        assert httpx.post(f"{server.url}/completions", json=body("a")).status_code == 503
        server.set_plan(FaultPlan())
        assert httpx.post(f"{server.url}/completions", json=body("a")).status_code == 200


def test_client_completes_every_prompt_under_mixed_faults() -> None:
    plan = FaultPlan(
        rate_429=0.05, retry_after_s=0.05, rate_500=0.05, rate_503=0.05, rate_reset=0.05,
        rate_stall=0.05, stall_s=5.0, rate_truncated=0.05, rate_malformed=0.05, seed=11,
    )  # fmt: skip
    batch = rows(100)
    with FaultTeacherServer(plan=plan) as server:
        spec = make_spec(server.url)
        done = asyncio.run(complete_all(spec, batch))
        by_key = server.by_key()
    assert all(len(c.samples) == 2 for c in done)
    for row, comp in zip(batch, done, strict=True):
        recs = [r for r in by_key[key_of(row)] if r.path == "/v1/completions"]
        assert [r.attempt for r in recs] == list(range(1, len(recs) + 1))
        tokenized = sum(r.path == "/tokenize" for r in by_key[key_of(row)])
        check_attempts([r.outcome for r in recs], comp.attempts, also_sent=tokenized, exact=False)
    faults = [r for recs in by_key.values() for r in recs if r.outcome != "ok"]
    assert {r.outcome for r in faults} == set(FAULTS)
    assert sum(c.attempts > 1 for c in done) >= 20
    assert sum(len(recs) > 2 for recs in by_key.values()) > 0  # some rows faulted twice
    rec: Record = faults[0]
    assert (rec.user_agent, rec.job_id, rec.authorization) == (USER_AGENT, "job-f", "Bearer sekrit")


def test_client_waits_for_retry_after_between_attempts() -> None:
    plan = FaultPlan(rate_429=1.0, retry_after_s=1.0, faulty_attempts=1)
    batch = rows(6)
    with FaultTeacherServer(plan=plan) as server:
        done = asyncio.run(complete_all(make_spec(server.url), batch))
        by_key = server.by_key()
    assert [c.attempts for c in done] == [1] * len(batch)  # a 429 is no attempt of the row
    for row in batch:
        first, second = (r for r in by_key[key_of(row)] if r.path == "/v1/completions")
        assert (first.outcome, first.retry_after, second.outcome) == ("429", "1", "ok")
        assert second.t - first.t >= 1.0


def test_latency_and_capacity_queue_requests() -> None:
    async def fire(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=10) as http:
            calls = (http.post(f"{url}/completions", json=body(f"q{i}")) for i in range(40))
            return [r.status_code for r in await asyncio.gather(*calls)]

    with FaultTeacherServer(plan=FaultPlan(latency_s=0.05, capacity=4)) as server:
        assert asyncio.run(fire(server.url)) == [200] * 40
        log = server.log
    assert max(r.busy for r in log) == 4
    assert all(r.t_done is not None and r.t_served is not None for r in log)
    assert max(r.t_done for r in log) - min(r.t for r in log) >= 0.5  # type: ignore[type-var]
    assert all(r.t_done - r.t_served >= 0.05 for r in log)  # type: ignore[operator]


def test_tokenize_and_token_id_prompts_are_keyed_by_their_text() -> None:
    """A chat row arrives as ids from /tokenize; the server still knows its last user message."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo"}]
    root_req = {"model": "fault", "messages": messages, "add_generation_prompt": True}
    with FaultTeacherServer(plan=FaultPlan(always_400={"héllo"})) as server, httpx.Client() as h:
        root = server.url.removesuffix("/v1")
        tok = h.post(f"{root}/tokenize", json=root_req).json()
        plain = h.post(f"{root}/tokenize", json={"model": "fault", "prompt": "abc"}).json()
        assert plain == {"tokens": encode_text("abc"), "count": 3, "max_model_len": 1024}
        assert tok["count"] == len(tok["tokens"]) and decode_prompt(tok["tokens"]) == messages
        chat = {**body(""), "prompt": tok["tokens"], "return_token_ids": True}
        assert h.post(f"{server.url}/completions", json=chat).status_code == 400
        ok = {**body(""), "prompt": encode_text("abc"), "return_token_ids": True, "n": 2}
        answer = h.post(f"{server.url}/completions", json=ok).json()
        missing = h.post(f"{root}/tokenize", json={"model": "fault"})
        log = server.log
    assert missing.status_code == 400
    assert [(r.path, r.key, r.attempt, r.outcome) for r in log] == [
        ("/tokenize", "héllo", 1, "ok"),
        ("/tokenize", "abc", 1, "ok"),
        ("/v1/completions", "héllo", 1, "400"),
        ("/v1/completions", "abc", 1, "ok"),
        ("/tokenize", None, 0, "400"),
    ]
    assert [c["prompt_token_ids"] for c in answer["choices"]] == [encode_text("abc")] * 2
    parsed = parse_completions(answer, 2)
    assert parsed.prompt_token_ids == encode_text("abc") and parsed.prompt_tokens == 3
    for choice, sample in zip(answer["choices"], parsed.samples, strict=True):
        assert choice["token_ids"] == sample.token_ids
        assert all(len(ids) == 2 for ids in sample.top_token_ids)


def test_sampled_token_outside_top_k_is_a_k_plus_1st_entry() -> None:
    fake = FakeTeacher(model="fault")
    req = {**body("many tokens"), "max_tokens": 64, "logprobs": 3, "return_token_ids": True}
    (choice,) = fake.answer(req)["choices"]
    sizes = Counter(len(entry) for entry in choice["logprobs"]["top_logprobs"])
    assert set(sizes) == {3, 4} and sizes[4] > 0  # both cases occur
    for tok, lp, entry in zip(
        choice["logprobs"]["tokens"],
        choice["logprobs"]["token_logprobs"],
        choice["logprobs"]["top_logprobs"],
        strict=True,
    ):
        assert next(iter(entry.items())) == (tok, lp)  # vLLM lists the sampled token first
        top3 = sorted(entry.values(), reverse=True)[:3]
        assert (len(entry) == 4) == (lp < top3[-1])


def test_malformed_is_a_right_shaped_200_with_one_null_logprob() -> None:
    with FaultTeacherServer(plan=FaultPlan(rate_malformed=1.0)) as server:
        bad = httpx.post(f"{server.url}/completions", json={**body("hi"), "max_tokens": 5})
        good = httpx.post(f"{server.url}/completions", json={**body("hi"), "max_tokens": 5})
        third = httpx.post(f"{server.url}/completions", json={**body("hi"), "max_tokens": 5})
    assert bad.status_code == good.status_code == third.status_code == 200
    lps = bad.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert lps.count(None) == 1 and len(lps) == 5
    assert [r.outcome for r in server.log] == ["malformed", "malformed", "ok"]
    with pytest.raises(InvalidResponse):
        parse_completions(bad.json(), 2)
    assert third.json()["choices"][0]["logprobs"]["token_logprobs"].count(None) == 0


def test_always_503_on_every_attempt() -> None:
    with FaultTeacherServer(plan=FaultPlan(always_503={"down"})) as server, httpx.Client() as h:
        statuses = [h.post(f"{server.url}/completions", json=body("down")).status_code]
        statuses += [h.post(f"{server.url}/completions", json=body("down")).status_code]
        statuses += [h.post(f"{server.url}/completions", json=body("down")).status_code]
        other = h.post(f"{server.url}/completions", json=body("fine")).status_code
        msg = h.post(f"{server.url}/completions", json=body("down")).json()["error"]
    assert statuses == [503] * 3 and other == 200
    assert msg["type"] == "ServiceUnavailableError" and "always_503" in msg["message"]
    assert [r.attempt for r in server.by_key()["down"]] == [1, 2, 3, 4]


def test_storm_answers_429_until_it_passes() -> None:
    """Judged by the server's arrival times: every request inside the storm got 429."""
    plan = FaultPlan(storm_s=0.3, retry_after_s=2.0)
    with FaultTeacherServer(plan=plan) as server, httpx.Client() as http:
        root = server.url.removesuffix("/v1")
        seen: list[int] = []
        for i in range(1000):  # bounded; ends as soon as the storm is over
            if i % 2:
                resp = http.post(f"{root}/tokenize", json={"model": "fault", "prompt": "x"})
            else:
                resp = http.post(f"{server.url}/completions", json=body(f"s{i}"))
            seen.append(resp.status_code)
            if resp.status_code == 200:
                break
            assert resp.headers["retry-after"] == "2"
            time.sleep(0.02)
        health = http.get(f"{root}/health").status_code
        log = server.log
    assert seen[-1] == 200 and set(seen[:-1]) == {429} and len(seen) > 2 and health == 200
    posts = [r for r in log if r.path != "/health"]
    start = posts[0].t
    assert all(r.t < start + 0.3 for r in posts if r.outcome == "429")
    assert posts[-1].outcome == "ok" and posts[-1].t >= start + 0.3
    assert {r.path for r in posts if r.outcome == "429"} == {"/tokenize", "/v1/completions"}
    assert {r.retry_after for r in posts if r.outcome == "429"} == {"2"}


def test_go_down_refuses_and_resets_then_comes_back_on_the_same_port() -> None:
    plan = FaultPlan(rate_stall=1.0, stall_s=30.0, faulty_attempts=1)
    with FaultTeacherServer(plan=plan) as server:
        port = server.port
        stalled: list[BaseException] = []

        def stall() -> None:
            try:
                httpx.post(f"{server.url}/completions", json=body("in flight"), timeout=20)
            except httpx.TransportError as err:
                stalled.append(err)

        thread = threading.Thread(target=stall)
        thread.start()
        for _ in range(2000):  # until the stalled request has arrived (20 s at most)
            if server.log:
                break
            time.sleep(0.01)
        server.go_down()
        thread.join(10)
        assert len(stalled) == 1 and not isinstance(stalled[0], httpx.TimeoutException)
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{server.url}/completions", json=body("refused"))
        server.come_back()
        assert server.port == port
        assert httpx.post(f"{server.url}/completions", json=body("in flight")).status_code == 200
        log = server.log
    assert [(r.key, r.attempt, r.outcome) for r in log] == [
        ("in flight", 1, "stall"),
        ("in flight", 2, "ok"),
    ]
    assert log[0].t_done is not None and log[0].t_done <= log[1].t
