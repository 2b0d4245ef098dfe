"""Score mode in the worker: prompt_logprobs parsing, loss masks, bad rows, whole units."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import jobs
import pyarrow.parquet as pq
import pytest
from fake_teacher import BOS, EOT, SEP, TURN, FakeTeacher, encode_text, render_chat

from schemas.wire import PromptRow, RowProblem, WorkUnit, request_id
from workers.errors import InvalidInput, InvalidResponse, MissingLogprobs
from workers.storage import open_store
from workers.teacher.client import TeacherClient, sampling_for
from workers.teacher.score import Scored, parse_scored, sequence
from workers.unit import harvest_unit

K = 3
USER = {"role": "user", "content": "hi"}


def score_spec(k: int = K) -> Any:
    settings = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "max_attempts": 3}
    teacher = jobs.model("fake", "http://teacher-a:8000", **settings)
    return jobs.spec(teacher, mode="score", sampling={"logprobs": k})


def entry(actual: int, own: float, top: list[tuple[int, float]]) -> dict[str, Any]:
    """A vLLM prompt_logprobs entry: the actual token first, then the top K by rank."""
    out = {str(actual): {"logprob": own, "rank": 9, "decoded_token": "x"}}
    for rank, (t, lp) in enumerate(top, start=1):
        out[str(t)] = {"logprob": lp, "rank": rank, "decoded_token": "y"}
    return out


def body(ids: list[int], plp: list[Any]) -> dict[str, Any]:
    choice = {"index": 0, "text": "z", "prompt_token_ids": ids, "prompt_logprobs": plp}
    return {"choices": [choice], "usage": {"prompt_tokens": len(ids)}}


SCORED = Scored([5, 6, 7], [False, True, True], "resp")


# --- parsing prompt_logprobs --------------------------------------------------------------------


def test_null_first_then_k_or_k_plus_one_keys_cut_to_k_best_first() -> None:
    plp = [
        None,
        entry(6, -5.0, [(10, -1.0), (11, -2.0), (12, -3.0)]),  # outside the top K: K+1 keys
        entry(7, -2.0, [(13, -0.5), (7, -2.0), (14, -2.5)]),  # inside: K keys
    ]
    answer = parse_scored(body([5, 6, 7], plp), SCORED, K)
    (s,) = answer.samples
    assert answer.prompt_token_ids == [5] and answer.prompt_tokens == 1
    assert s.token_ids == [6, 7] and s.loss_mask == [True, True]
    assert s.logprobs == [-5.0, -2.0]
    assert s.top_token_ids == [[10, 11, 12], [13, 7, 14]]
    assert s.top_logprobs == [[-1.0, -2.0, -3.0], [-0.5, -2.0, -2.5]]
    assert (s.finish_reason, s.response, s.sample_index) == ("score", "resp", 0)


def test_added_actual_token_is_dropped_even_when_it_ties_the_kth() -> None:
    plp = [None, entry(6, -3.0, [(10, -1.0), (11, -2.0), (12, -3.0)])]
    (s,) = parse_scored(body([5, 6], plp), Scored([5, 6], [False, True], "r"), K).samples
    assert s.top_token_ids == [[10, 11, 12]] and s.logprobs == [-3.0]


def test_k_zero_keeps_only_the_tokens_own_logprob() -> None:
    plp = [None, entry(6, -4.0, []), entry(7, -1.5, [])]
    (s,) = parse_scored(body([5, 6, 7], plp), SCORED, 0).samples
    assert s.logprobs == [-4.0, -1.5] and s.top_token_ids == [[], []]


TOP = [(1, -0.1), (2, -0.2), (3, -0.3)]


@pytest.mark.parametrize(
    ("plp", "error"),
    [
        (None, MissingLogprobs),  # the server ignored prompt_logprobs
        ([None, entry(6, -1.0, TOP)], InvalidResponse),  # not as long as the prompt
        ([entry(5, -1, TOP), entry(6, -1, TOP), entry(7, -1, TOP)], InvalidResponse),  # no null
        ([None, entry(6, -1.0, TOP), "x"], InvalidResponse),  # an entry that is no object
        ([None, entry(6, -1.0, TOP), entry(7, -1.0, TOP[:1])], MissingLogprobs),  # < K
        (
            [None, entry(6, -1.0, TOP), {**entry(7, -1.0, TOP), "8": {"logprob": -9}}],
            InvalidResponse,
        ),  # > K + 1
        ([None, entry(9, -1.0, TOP[:2]), entry(7, -1.0, TOP)], InvalidResponse),  # no token 6
        (
            [None, {**entry(6, -1.0, TOP), "6": {"logprob": None}}, entry(7, -1.0, TOP)],
            InvalidResponse,
        ),
        (
            [None, {**entry(6, -1.0, TOP), "a": {"logprob": -1.0}}, entry(7, -1.0, TOP)],
            InvalidResponse,
        ),
    ],
)
def test_wrong_shapes_are_classified(plp: Any, error: type) -> None:
    with pytest.raises(error):
        parse_scored(body([5, 6, 7], plp), SCORED, K)


def test_other_ids_scored_than_sent_is_invalid() -> None:
    plp = [None, entry(6, -1.0, []), entry(7, -1.0, [])]
    with pytest.raises(InvalidResponse, match="other token ids"):
        parse_scored(body([5, 6, 8], plp), SCORED, 0)


# --- sequences and masks ------------------------------------------------------------------------


def tokenizer(fake: FakeTeacher):
    async def tokenize(b: dict[str, Any]) -> list[int]:
        return fake.tokenize({"model": "fake", **b})["tokens"]

    return tokenize


def test_prompt_and_response_are_tokenised_apart_and_the_mask_is_the_response() -> None:
    row = PromptRow("a", "s", prompt="Q:", response="ok")
    scored = asyncio.run(sequence(tokenizer(FakeTeacher(add_bos=True)), row))
    assert scored.ids == [BOS, *encode_text("Q:"), *encode_text("ok")]  # one BOS, the prompt's
    assert scored.mask == [False, False, False, True, True]
    assert scored.response == "ok"


def test_chat_mask_covers_each_assistant_turn_and_its_end_of_turn_token() -> None:
    a1, a2 = {"role": "assistant", "content": "yo"}, {"role": "assistant", "content": "ok!"}
    messages = [USER, a1, USER, a2]
    scored = asyncio.run(sequence(tokenizer(FakeTeacher()), PromptRow("c", "s", messages=messages)))
    assert scored.ids == render_chat(messages, add_generation_prompt=False)
    # BOS | TURN user SEP hi EOT | TURN assistant SEP [yo EOT] | TURN user SEP hi EOT | ...
    turn = [TURN, *encode_text("assistant"), SEP]
    first = 1 + (1 + 4 + 1 + 2 + 1) + len(turn)  # where "yo" starts
    second = first + 3 + 9 + len(turn)  # past "yo" EOT and the user turn: "ok!" starts
    expected = [False] * len(scored.ids)
    expected[first : first + 3] = [True] * 3
    expected[second : second + 4] = [True] * 4
    assert scored.mask == expected
    assert [scored.ids[i] for i, m in enumerate(scored.mask) if m] == [
        *encode_text("yo"), EOT, *encode_text("ok!"), EOT
    ]  # fmt: skip
    assert scored.response == "ok!"


def test_a_template_that_rewrites_earlier_turns_is_invalid_input() -> None:
    async def tokenize(b: dict[str, Any]) -> list[int]:
        ids = render_chat(b["messages"], bool(b.get("add_generation_prompt")))
        return ids if b.get("add_generation_prompt") else [BOS, 99, *ids[1:]]

    row = PromptRow("c", "s", messages=[USER, {"role": "assistant", "content": "yo"}])
    with pytest.raises(InvalidInput, match="messages\\[:1\\] with the generation prompt"):
        asyncio.run(sequence(tokenize, row))


# --- whole units through the client -------------------------------------------------------------


def harvest(tmp_path, fake: FakeTeacher, rows: list[PromptRow | RowProblem]):
    spec = score_spec()

    async def go():
        client = TeacherClient(spec, job_id="j", transport=fake.transport())
        try:
            return await harvest_unit(
                WorkUnit("u-0", rows), client, spec, open_store(str(tmp_path)), {}
            )
        finally:
            await client.aclose()

    return spec, asyncio.run(go())


def rewrite_turns(b: dict[str, Any], n: int) -> httpx.Response | None:
    """A template that renders the first turns of "bad" differently once more follow."""
    msgs = b.get("messages")
    if msgs and msgs[0]["content"] == "bad" and not b.get("add_generation_prompt"):
        ids = render_chat(msgs, False)
        return httpx.Response(200, json={"tokens": [BOS, 99, *ids[1:]]})
    return None


def test_a_score_unit_records_every_row_once(tmp_path) -> None:
    fake = FakeTeacher(add_bos=True, script=rewrite_turns)
    chat = [USER, {"role": "assistant", "content": "yo"}]
    bad = [{"role": "user", "content": "bad"}, {"role": "assistant", "content": "x"}]
    rows = [
        PromptRow("p", "in:1", prompt="Q:", response="ok"),
        PromptRow("c", "in:2", messages=chat),
        PromptRow("bad", "in:3", messages=bad),
        RowProblem("nr", "in:4", "score mode: row has no 'response' to score"),
    ]
    spec, result = harvest(tmp_path, fake, rows)
    data_path, failed_path = tmp_path / result.data_path, tmp_path / result.failed_path
    data = {r["prompt_id"]: r for r in pq.read_table(data_path).to_pylist()}
    failed = {r["prompt_id"]: r for r in pq.read_table(failed_path).to_pylist()}
    assert (result.data_rows, result.failure_rows) == (2, 2)
    assert {k: v["error_class"] for k, v in failed.items()} == {
        "bad": "InvalidInput", "nr": "InvalidInput"
    }  # fmt: skip
    assert "cannot be located" in failed["bad"]["message"] and failed["bad"]["attempts"] == 1

    p = data["p"]
    ids = [BOS, *encode_text("Q:"), *encode_text("ok")]
    assert p["prompt_token_ids"] + p["token_ids"] == ids and p["prompt_token_ids"] == [BOS]
    assert p["loss_mask"] == [False, False, True, True]
    assert p["logprobs"] == pytest.approx(
        [fake.prompt_logprob(ids[:j], ids[j], K)[str(ids[j])]["logprob"] for j in range(1, 5)]
    )
    assert all(len(t) == K for t in p["top_token_ids"])
    assert all(t == sorted(t, reverse=True) for t in p["top_logprobs"])
    assert (p["response"], p["finish_reason"], p["api"]) == ("ok", "score", "completions")
    assert p["request_id"] == request_id("p", 0, "fake", sampling_for(spec, rows[0]))
    assert p["completion_tokens"] == 4 and p["prompt_tokens"] == 1

    c = data["c"]
    assert c["prompt_token_ids"] + c["token_ids"] == render_chat(chat, False)
    assert [t for t, m in zip(c["token_ids"], c["loss_mask"], strict=True) if m] == [
        *encode_text("yo"), EOT
    ]  # fmt: skip
    assert (c["response"], c["api"], c["messages"]) == ("yo", "chat", chat)

    sent = [b for _, path, b, _ in fake.calls if path.endswith("/completions")]
    assert {(b["max_tokens"], b["n"], b["prompt_logprobs"]) for b in sent} == {(1, 1, K)}
    assert all("logprobs" not in b for b in sent)


def test_a_retried_score_request_is_tokenised_once(tmp_path) -> None:
    def flaky(b: dict[str, Any], n: int) -> httpx.Response | None:
        if "prompt_logprobs" in b and not flaky.failed:
            flaky.failed = True
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return None

    flaky.failed = False
    fake = FakeTeacher(add_bos=True, script=flaky)
    _, result = harvest(tmp_path, fake, [PromptRow("p", "in:1", prompt="Q:", response="ok")])
    assert (result.data_rows, result.retries) == (1, 1)
    paths = [path for _, path, _, _ in fake.calls]
    assert paths.count("/tokenize") == 2 and paths.count("/v1/completions") == 2
