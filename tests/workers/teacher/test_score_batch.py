"""Score mode's batches: several ids rows in one ``/v1/completions`` request.

A batch must give every row exactly what it gets alone; a batch the teacher refuses is sent
again row by row, so one bad row is one failure record and the others are data.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import jobs
import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from fake_teacher import FakeTeacher

from schemas.wire import PromptRow, WorkUnit
from workers.answers import fastparse
from workers.errors import AuthError, InvalidResponse
from workers.storage import open_store
from workers.teacher.client import TeacherClient
from workers.teacher.score import Scored, parse_batch, read_batch, read_scored
from workers.unit import harvest_unit

K = 3
BAD_ID = 99_999  # "out of vocabulary": the scripted teacher refuses any request holding it


def fake_body(seqs: list[list[int]], k: int) -> bytes:
    body = {"model": "fake", "prompt": seqs, "max_tokens": 1, "prompt_logprobs": k}
    return orjson.dumps(FakeTeacher().answer({**body, "return_token_ids": True}))


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_a_batch_reads_as_each_of_its_sequences_alone(k: int) -> None:
    rng = random.Random(k)
    seqs = [[rng.randrange(100) for _ in range(rng.randrange(2, 30))] for _ in range(6)]
    batch = [Scored(s, [None] * len(s), "", rng.randrange(1, len(s))) for s in seqs]
    raw = fake_body(seqs, k)
    assert fastparse.scan_prompts(raw, [(s.ids, s.start) for s in batch], k) is not None
    fast, checked = read_batch(raw, batch, k), parse_batch(orjson.loads(raw), batch, k)
    for scored, a, b in zip(batch, fast, checked, strict=True):
        (alone,) = read_scored(fake_body([scored.ids], k), scored, k).samples
        for got in (a.samples[0], b.samples[0]):
            assert got.token_ids == alone.token_ids == scored.ids[scored.start :]
            for field in ("logprobs", "top_token_ids", "top_logprobs"):
                assert plain(getattr(got, field)) == plain(getattr(alone, field)), field
        assert a.prompt_token_ids == scored.ids[: scored.start]


def plain(values: Any) -> list[Any]:
    """Arrays (the fast path) and lists (the checked path) alike, as nested lists."""
    return np.asarray(values, dtype=np.float64).tolist()


def edited(raw: bytes, edit: Any) -> bytes:
    body = orjson.loads(raw)
    edit(body["choices"])
    return orjson.dumps(body)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.reverse(),  # the choices in another order than the prompts
        lambda c: c.pop(),  # one choice missing
        lambda c: c.append(dict(c[0])),  # one too many
        lambda c: c[1].__setitem__("prompt_token_ids", [1, 2]),  # other ids than sent
    ],
)
def test_a_batch_answer_that_does_not_match_its_prompts_is_invalid(edit: Any) -> None:
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    batch = [Scored(s, [None] * len(s), "", 1) for s in seqs]
    raw = edited(fake_body(seqs, K), edit)
    with pytest.raises(InvalidResponse):
        read_batch(raw, batch, K)


# --- whole units through the client -------------------------------------------------------------


def refuse_bad(body: dict[str, Any], n: int) -> httpx.Response | None:
    """vLLM's answer to a request holding an id outside the vocabulary: 400 for all of it."""
    prompt = body.get("prompt")
    seqs = prompt if prompt and isinstance(prompt[0], list) else [prompt or []]
    if any(BAD_ID in s for s in seqs):
        return httpx.Response(
            400, json={"error": {"message": f"Token id {BAD_ID} is out of vocabulary"}}
        )
    return None


def ids_row(i: int, **kw: Any) -> PromptRow:
    tail = [BAD_ID] if kw.pop("bad", False) else []
    ids = [(7 * i + j) % 90 + 1 for j in range(3 + i % 5)] + tail
    return PromptRow(f"r{i}", f"in:{i}", prompt_token_ids=[1, 2], token_ids=ids, **kw)


def harvest(tmp_path, fake: FakeTeacher, rows: list[PromptRow], per_request: int, **teacher: Any):
    settings = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "max_attempts": 3, **teacher}
    teacher = jobs.model("fake", "http://teacher-a:8000", **settings)
    spec = jobs.spec(
        teacher, mode="score", sampling={"logprobs": K},
        concurrency={"score_rows_per_request": per_request},
    )  # fmt: skip
    out = tmp_path / f"out-{per_request}"

    async def go():
        client = TeacherClient(spec, job_id="j", transport=fake.transport())
        try:
            result = await harvest_unit(
                WorkUnit("u-0", rows), client, spec, open_store(str(out)), {}
            )
            return result, client.counters
        finally:
            await client.aclose()

    result, counters = asyncio.run(go())
    data = {r["prompt_id"]: r for r in pq.read_table(out / result.data_path).to_pylist()}
    failed = {}
    if result.failed_path:
        failed = {r["prompt_id"]: r for r in pq.read_table(out / result.failed_path).to_pylist()}
    return data, failed, counters


def sent(fake: FakeTeacher) -> list[Any]:
    """The prompt of every completions request, in order."""
    return [b["prompt"] for _, path, b, _ in fake.calls if path == "/v1/completions"]


CONTENT = ("token_ids", "prompt_token_ids", "logprobs", "top_token_ids", "top_logprobs")


def test_batched_rows_get_the_records_they_get_alone(tmp_path) -> None:
    rows = [ids_row(i) for i in range(10)]
    alone, batched = FakeTeacher(), FakeTeacher()
    one, none_failed, _ = harvest(tmp_path, alone, rows, 1)
    four, also_none, counters = harvest(tmp_path, batched, rows, 4)
    assert none_failed == also_none == {} and sorted(one) == sorted(four) == [
        r.prompt_id for r in rows
    ]
    for pid, rec in one.items():
        assert {c: four[pid][c] for c in CONTENT} == {c: rec[c] for c in CONTENT}
        assert (rec["request_id"], rec["attempts"]) == (four[pid]["request_id"], 1)
        assert four[pid]["attempts"] == 1
    assert sorted(len(p) for p in sent(batched)) == [2, 4, 4]  # 10 rows: three requests
    assert all(isinstance(p[0], list) for p in sent(batched))
    assert len(sent(alone)) == 10 and "batches_split" not in counters


def test_a_refused_batch_is_sent_row_by_row_and_only_the_bad_row_fails(tmp_path) -> None:
    rows = [ids_row(i, bad=i == 2) for i in range(4)]
    fake = FakeTeacher(script=refuse_bad)
    data, failed, counters = harvest(tmp_path, fake, rows, 4)
    assert sorted(data) == ["r0", "r1", "r3"] and sorted(failed) == ["r2"]
    bad = failed["r2"]
    assert bad["error_class"] == "BadRequest" and "out of vocabulary" in bad["message"]
    assert bad["attempts"] == 2  # the batch, then alone (a 400 is not retried)
    assert all(rec["attempts"] == 2 for rec in data.values())
    prompts = sent(fake)
    assert len(prompts[0]) == 4 and isinstance(prompts[0][0], list)  # the batch first
    assert sorted(map(tuple, prompts[1:])) == sorted(
        tuple(r.prompt_token_ids + r.token_ids) for r in rows
    )
    assert counters["batches_split"] == 1


def test_rows_with_another_temperature_share_no_request(tmp_path) -> None:
    rows = [ids_row(i) for i in range(5)] + [
        ids_row(i, overrides={"temperature": 0.5}) for i in range(5, 8)
    ]
    rows.append(ids_row(8, overrides={"temperature": 0.25}))  # alone in its group
    fake = FakeTeacher()
    data, failed, _ = harvest(tmp_path, fake, rows, 8)
    assert len(data) == 9 and failed == {}
    sizes = sorted(
        (b["temperature"], len(b["prompt"]) if isinstance(b["prompt"][0], list) else 1)
        for _, path, b, _ in fake.calls
        if path == "/v1/completions"
    )
    assert sizes == [(0.25, 1), (0.5, 3), (1.0, 5)]


def test_a_fatal_answer_to_a_batch_stops_the_unit(tmp_path) -> None:
    def deny(body: dict[str, Any], n: int) -> httpx.Response | None:
        if "prompt_logprobs" in body:
            return httpx.Response(401, json={"error": {"message": "no key"}})
        return None

    with pytest.raises(AuthError):
        harvest(tmp_path, FakeTeacher(script=deny), [ids_row(i) for i in range(4)], 4)


def test_a_batch_stays_within_the_workers_share_of_tokens_per_minute(tmp_path) -> None:
    rows = [ids_row(i) for i in range(10)]  # 2 prompt ids + 3-7 response ids each
    costs = {tuple(r.prompt_token_ids + r.token_ids): len(r.prompt_token_ids + r.token_ids) - 1
             for r in rows}  # fmt: skip
    fake = FakeTeacher()
    # two workers: each worker's share is 10 tokens a minute, so at most two rows a request
    data, failed, _ = harvest(tmp_path, fake, rows, 8, rate_limit={"tokens_per_min": 20})
    assert len(data) == 10 and failed == {}
    sizes = []
    for prompt in sent(fake):
        seqs = prompt if isinstance(prompt[0], list) else [prompt]
        sizes.append(len(seqs))
        assert len(seqs) == 1 or sum(costs[tuple(s)] for s in seqs) <= 10
    assert sum(sizes) == 10 and max(sizes) == 2  # batches still formed, only smaller
