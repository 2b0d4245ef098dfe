"""Score mode's batches against the real vLLM server: one request, several sequences.

vLLM answers a list of token-id prompts with one choice per prompt, each with its own
``prompt_logprobs``. Each row of a batch must get what the same row gets alone (and what a
transformers forward of the same weights gives); one id the server refuses fails the whole
request, and then only that row becomes a failure.
"""

from __future__ import annotations

import asyncio
import math

import jobs
import pytest
from test_score_ids_real import forward, tokenize  # noqa: F401 - a fixture, used by name

from schemas.wire import Completion, PromptRow
from workers.errors import BadRequest
from workers.teacher.client import TeacherClient, request_for

pytestmark = pytest.mark.integration

K = 5
VOCAB = 1024  # the tiny Llama's


def rows_of(url: str) -> list[PromptRow]:
    prompt = tokenize(url, prompt="Score this:")
    texts = ["a short one", "then a longer answer with more words", "x", "the end of it"]
    return [
        PromptRow(
            f"b{i}",
            f"in:{i}",
            prompt_token_ids=prompt,
            token_ids=tokenize(url, prompt=text, add_special_tokens=False),
        )
        for i, text in enumerate(texts)
    ]


def outcomes(url: str, rows: list[PromptRow], batched: bool) -> list[Completion | Exception]:
    spec = jobs.spec(jobs.model("tiny", url), mode="score", sampling={"logprobs": K})

    async def go() -> list[Completion | Exception]:
        client = TeacherClient(spec, job_id="batch-real")
        try:
            requests = [request_for(spec, row) for row in rows]
            if batched:
                return await client.score_batch(rows, requests)
            got: list[Completion | Exception] = []
            for row, request in zip(rows, requests, strict=True):
                try:
                    got.append(await client.complete(row, request=request))
                except BadRequest as err:
                    got.append(err)
            return got
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_a_batch_scores_each_row_as_it_is_scored_alone(tiny_teacher, forward):  # noqa: F811
    rows = rows_of(tiny_teacher)
    together, alone = outcomes(tiny_teacher, rows, True), outcomes(tiny_teacher, rows, False)
    for row, a, b in zip(rows, together, alone, strict=True):
        assert isinstance(a, Completion) and isinstance(b, Completion)
        (sa,), (sb,) = a.samples, b.samples
        assert sa.token_ids == sb.token_ids == row.token_ids
        assert a.prompt_token_ids == row.prompt_token_ids
        assert sa.top_token_ids.tolist() == sb.top_token_ids.tolist()
        for x, y in zip(sa.logprobs, sb.logprobs, strict=True):
            assert math.isclose(x, y, abs_tol=1e-5)
        lsm = forward(row.prompt_token_ids + row.token_ids)
        p = len(row.prompt_token_ids)
        for j, tid in enumerate(row.token_ids):
            assert math.isclose(float(sa.logprobs[j]), float(lsm[p + j - 1][tid]), abs_tol=1e-4)
            assert sa.top_token_ids[j].tolist() == lsm[p + j - 1].topk(K).indices.tolist()


def test_one_id_the_server_refuses_fails_only_its_row(tiny_teacher):
    rows = rows_of(tiny_teacher)
    bad = rows[1]
    rows[1] = PromptRow(bad.prompt_id, bad.source, prompt_token_ids=bad.prompt_token_ids,
                        token_ids=[*bad.token_ids, VOCAB + 5])  # fmt: skip
    got = outcomes(tiny_teacher, rows, True)
    assert [type(g).__name__ for g in got] == [
        "Completion",
        "BadRequest",
        "Completion",
        "Completion",
    ]
    refused = got[1]
    assert isinstance(refused, BadRequest) and refused.attempts == 2  # the batch, then alone
    assert "vocab" in str(refused)
    assert all(g.attempts == 2 for g in got if isinstance(g, Completion))
