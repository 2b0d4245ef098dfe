"""Teacher client: payloads, parsing, retries and error classes, over httpx.MockTransport."""

from __future__ import annotations

import asyncio

import httpx
import jobs
import pytest
from fake_teacher import FakeTeacher

from schemas.wire import PromptRow
from workers import USER_AGENT
from workers.errors import (
    AuthError,
    BadRequest,
    InvalidResponse,
    MissingLogprobs,
    ModelNotFound,
    TeacherOutage,
    TeacherUnavailable,
)
from workers.teacher.client import TeacherClient

K = 3


def make_spec(**teacher):
    urls = ["http://teacher-a:8000", "http://teacher-b:8000"]
    settings = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "max_attempts": 4, **teacher}
    return jobs.spec(
        jobs.model("fake", urls, **settings),
        sampling={"max_tokens": 6, "n": 2, "logprobs": K, "seed": 3},
    )


def run(coro):
    return asyncio.run(coro)


async def complete(
    fake: FakeTeacher,
    row: PromptRow,
    api_key: str | None = None,
    endpoints: list[str] | None = None,
    **teacher,
):
    client = TeacherClient(
        make_spec(**teacher),
        job_id="job1",
        api_key=api_key,
        transport=fake.transport(),
        endpoints=endpoints,
    )
    try:
        return await client.complete(row), client
    finally:
        await client.aclose()


PROMPT = PromptRow("p1", "x.jsonl:1", prompt="Hello")
CHAT = PromptRow("c1", "x.jsonl:2", messages=[{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("row", [PROMPT, CHAT], ids=["completions", "chat"])
def test_samples_carry_ids_and_exact_top_k(row):
    fake = FakeTeacher()
    done, _ = run(complete(fake, row))
    _, path, body, _ = fake.calls[-1]
    assert path.endswith("/v1/completions") and body["logprobs"] == K
    assert body["return_tokens_as_token_ids"] is True and body["return_token_ids"] is True
    assert len(done.samples) == 2 and done.attempts == 1
    for i, sample in enumerate(done.samples):
        steps = fake._steps(body, i)
        assert sample.token_ids == [t for t, _, _ in steps]
        assert sample.logprobs == pytest.approx([lp for _, lp, _ in steps])
        for (_, _, alts), ids, lps in zip(
            steps, sample.top_token_ids, sample.top_logprobs, strict=True
        ):
            true_top = sorted(alts, key=lambda a: a[1], reverse=True)[:K]
            assert ids.tolist() == [a for a, _ in true_top]
            assert lps.tolist() == sorted(lps, reverse=True) and len(ids) == K
    if row.messages is not None:  # rendered by the server's own chat template, sent as ids
        _, tok_path, tok_body, _ = fake.calls[0]
        assert tok_path == "/tokenize" and len(fake.calls) == 2
        assert tok_body["messages"] == row.messages and tok_body["add_generation_prompt"] is True
        assert body["prompt"] == fake.tokenize(tok_body)["tokens"] == done.prompt_token_ids
    else:
        assert body["prompt"] == row.prompt and len(fake.calls) == 1
        assert done.prompt_token_ids == fake.tokenize({"prompt": row.prompt})["tokens"]


def test_a_chat_row_is_rendered_once_across_attempts():
    fake = FakeTeacher(script=lambda b, n: httpx.Response(503) if n == 2 else None)
    done, _ = run(complete(fake, CHAT))
    assert [c[1] for c in fake.calls] == ["/tokenize", "/v1/completions", "/v1/completions"]
    assert done.attempts == 2


def test_identifies_itself_and_sends_key_only_as_bearer():
    fake = FakeTeacher()
    run(complete(fake, PROMPT, api_key="sk-secret"))
    headers = fake.calls[0][3]
    assert headers["user-agent"] == USER_AGENT
    assert headers["x-harvest-job-id"] == "job1"
    assert headers["authorization"] == "Bearer sk-secret"


def test_per_row_overrides_reach_the_request():
    fake = FakeTeacher()
    row = PromptRow("p", "s", prompt="x", overrides={"max_tokens": 2, "n": 1, "temperature": 0})
    done, _ = run(complete(fake, row))
    body = fake.calls[0][2]
    assert (body["max_tokens"], body["n"], body["temperature"]) == (2, 1, 0)
    assert len(done.samples) == 1 and len(done.samples[0].token_ids) == 2


def test_503_then_success_is_retried_and_counted():
    fake = FakeTeacher(script=lambda body, n: httpx.Response(503) if n <= 2 else None)
    done, client = run(complete(fake, PROMPT))
    assert done.attempts == 3 and len(fake.calls) == 3
    assert client.counters["ServerError"] == 2 and client.counters["retries"] == 2


def test_retry_after_pauses_the_endpoint_and_is_not_an_attempt():
    fake = FakeTeacher(
        script=lambda b, n: httpx.Response(429, headers={"Retry-After": "0.4"}) if n == 1 else None
    )
    done, client = run(complete(fake, PROMPT, endpoints=["http://teacher-a:8000"]))
    (t0, *_), (t1, *_) = fake.calls
    assert done.attempts == 1 and client.counters["RateLimited"] == 1  # the row is not charged
    assert t1 - t0 >= 0.4  # our backoff alone would be <= 0.05 s


def test_retries_spread_over_endpoints():
    fake = FakeTeacher(script=lambda b, n: httpx.Response(502) if n == 1 else None)
    run(complete(fake, PROMPT))
    assert [c[3]["host"] for c in fake.calls] == ["teacher-a:8000", "teacher-b:8000"]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BadRequest),
        (422, BadRequest),
        (401, AuthError),
        (403, AuthError),
        (404, ModelNotFound),
    ],
)
def test_non_retryable_statuses_are_classified_and_not_retried(status, error):
    fake = FakeTeacher(
        script=lambda b, n: httpx.Response(status, json={"error": {"message": "nope"}})
    )
    with pytest.raises(error) as info:
        run(complete(fake, PROMPT))
    assert len(fake.calls) == 1
    assert info.value.http_status == status and "nope" in str(info.value)


def test_connection_errors_exhaust_attempts():
    def refuse(body, n):
        raise httpx.ConnectError("refused")

    fake = FakeTeacher(script=refuse)
    with pytest.raises(TeacherUnavailable) as info:
        run(complete(fake, PROMPT))
    assert len(fake.calls) == 4 and info.value.attempts == 4


def test_transport_failure_outside_httpx_tree_is_retried():
    def broken_socket(body, n):
        if n == 1:  # what anyio raised when a replica died mid-connect
            raise AttributeError("'NoneType' object has no attribute 'getpeername'")
        return None

    done, client = run(complete(FakeTeacher(script=broken_socket), PROMPT))
    assert done.attempts == 2 and client.counters["TeacherUnavailable"] == 1


def test_truncated_body_is_retried():
    fake = FakeTeacher(
        script=lambda b, n: httpx.Response(200, content=b'{"choi') if n == 1 else None
    )
    done, client = run(complete(fake, PROMPT))
    assert done.attempts == 2 and client.counters["InvalidResponse"] == 1


def test_wrong_number_of_choices_is_invalid():
    fake = FakeTeacher(script=lambda b, n: httpx.Response(200, json={"choices": []}))
    with pytest.raises(InvalidResponse):
        run(complete(fake, PROMPT))


def test_answer_without_logprobs_is_a_row_failure_without_retry():
    answer = {"choices": [{"index": 0, "text": "hi", "logprobs": None}] * 2}
    fake = FakeTeacher(script=lambda b, n: httpx.Response(200, json=answer))
    with pytest.raises(MissingLogprobs):
        run(complete(fake, PROMPT))
    assert len(fake.calls) == 1


def test_sustained_429s_never_fail_the_row_and_end_at_the_outage_deadline():
    fake = FakeTeacher(script=lambda b, n: httpx.Response(429))  # no Retry-After: backoff
    with pytest.raises(TeacherOutage) as info:
        run(complete(fake, PROMPT, outage_timeout_s=0.5))
    assert len(fake.calls) > 4  # far past max_attempts: 429s are not the row's attempts
    assert "teacher-a" in str(info.value) and "teacher-b" in str(info.value)


def test_a_retry_after_longer_than_the_request_budget_is_waited_out():
    fake = FakeTeacher(
        script=lambda b, n: httpx.Response(429, headers={"Retry-After": "1"}) if n == 1 else None
    )
    done, _ = run(complete(fake, PROMPT, max_request_time_s=0.5))
    assert done.attempts == 1 and len(fake.calls) == 2


def test_a_dead_teacher_is_an_outage_not_a_row_failure():
    def refuse(body, n):
        raise httpx.ConnectError("refused")

    fake = FakeTeacher(script=refuse)
    with pytest.raises(TeacherOutage) as info:
        run(complete(fake, PROMPT, max_attempts=50, outage_timeout_s=0.5))
    assert "circuit open since" in str(info.value) and "TeacherUnavailable" in str(info.value)


def test_retry_after_forms():
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    from workers.teacher.retry import parse_retry_after

    now = datetime(2026, 1, 1, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert parse_retry_after(date, now=now.timestamp()) == pytest.approx(7.0)
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("inf") == float("inf")
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
