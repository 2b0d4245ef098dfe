"""The preflight probe through a real client: one tiny request per kind of row, at the job's K."""

from __future__ import annotations

import asyncio

import httpx
from fake_teacher import FakeTeacher
from test_client import K, make_spec

from workers.teacher.client import TeacherClient
from workers.teacher.probe import probe


def run_probe(fake: FakeTeacher, kinds: list[str]):
    async def go():
        client = TeacherClient(make_spec(), job_id="j", transport=fake.transport())
        try:
            return await probe(client, kinds)
        finally:
            await client.aclose()

    return asyncio.run(go())


def completions_bodies(fake: FakeTeacher) -> list[dict]:
    return [body for _, path, body, _ in fake.calls if path.endswith("/completions")]


def test_one_request_per_kind_then_one_for_the_mode() -> None:
    fake = FakeTeacher()
    result = run_probe(fake, ["chat", "completions"])
    assert result.failed == {} and result.mode_error is None
    bodies = completions_bodies(fake)
    assert [(b["max_tokens"], b["n"], b["logprobs"]) for b in bodies] == [(2, 1, K)] * 3
    assert [b["temperature"] for b in bodies] == [1.0, 1.0, 0.5]
    assert isinstance(bodies[0]["prompt"], list)  # the chat probe went through /tokenize
    assert bodies[1]["prompt"] == bodies[2]["prompt"] == "Hello"
    assert any(path.endswith("/tokenize") for _, path, _, _ in fake.calls)
    assert set(result.tops) == {1.0, 0.5} and len(result.tops[1.0]) == K
    assert result.tops[1.0] == result.tops[0.5]  # the fake's values ignore temperature: raw


def test_only_the_kinds_present_are_probed() -> None:
    fake = FakeTeacher()
    result = run_probe(fake, ["chat"])
    assert not any(path.endswith("/completions") and isinstance(body["prompt"], str)
                   for _, path, body, _ in fake.calls)  # fmt: skip
    assert set(result.tops) == {1.0, 0.5}  # the mode is told from chat requests then
    assert run_probe(FakeTeacher(), []).tops == {}


def test_a_kind_the_teacher_rejects_is_named_with_the_servers_reason() -> None:
    def reject_chat(body, n):
        if isinstance(body.get("prompt"), list):  # the chat row, as token ids
            msg = "Requested sample logprobs of 21, which is greater than max allowed: 20"
            return httpx.Response(400, json={"error": {"message": msg}})
        return None

    result = run_probe(FakeTeacher(script=reject_chat), ["chat", "completions"])
    assert list(result.failed) == ["chat"]
    assert result.failed["chat"].startswith("BadRequest: HTTP 400: Requested sample logprobs")
    assert "\n" not in result.failed["chat"]


def test_score_mode_probes_the_scoring_path_of_each_kind() -> None:
    from test_score import score_spec

    fake = FakeTeacher(add_bos=True)

    async def go():
        client = TeacherClient(score_spec(K), job_id="j", transport=fake.transport())
        try:
            return await probe(client, ["chat", "completions"])
        finally:
            await client.aclose()

    result = asyncio.run(go())
    assert result.failed == {} and result.mode_error is None
    bodies = completions_bodies(fake)
    assert [(b["max_tokens"], b["prompt_logprobs"]) for b in bodies] == [(1, K)] * 3
    assert [b["temperature"] for b in bodies] == [1.0, 1.0, 0.5]
    assert len(result.tops[1.0]) == K and result.tops[1.0] == result.tops[0.5]
    tokenized = [b for _, path, b, _ in fake.calls if path.endswith("/tokenize")]
    assert {"prompt": "Hi there", "add_special_tokens": False, "model": "fake"} in tokenized


def test_a_refused_k_stops_the_probe_with_the_servers_cap() -> None:
    """vLLM's 400 names the refused field in its structured ``param``: the class comes from
    there (never from the message); the cap itself only from the message text."""

    def cap(body, n):
        if body.get("logprobs"):
            msg = f"Requested sample logprobs of {K}, which is greater than max allowed: 2"
            return httpx.Response(400, json={"error": {"message": msg, "param": "logprobs"}})
        return None

    fake = FakeTeacher(script=cap)
    result = run_probe(fake, ["chat", "completions"])
    assert result.above_cap and result.max_logprobs == 2
    assert list(result.failed) == ["chat"]  # the first refusal ends the probe
    assert len(completions_bodies(fake)) == 1
    # Without the structured field it stays an ordinary refused row, whatever the text says.
    text_only = {"error": {"message": "greater than max allowed: 2"}}
    plain = run_probe(
        FakeTeacher(script=lambda b, n: httpx.Response(400, json=text_only)), ["completions"]
    )
    assert not plain.above_cap and list(plain.failed) == ["completions"]


def test_the_above_cap_line_says_how_to_raise_it() -> None:
    from harvest.driver.preflight import above_cap_line

    line = above_cap_line(129, 128)
    assert "at most 128" in line and "sampling.logprobs=129" in line
    assert "--max-logprobs 129" in line and "teacher.replicas.vllm_args" in line
    assert "did not say" in above_cap_line(50, None) and "\n" not in line
