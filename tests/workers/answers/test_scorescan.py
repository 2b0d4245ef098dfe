"""``read_scored`` (prompt_logprobs read from the body's bytes) against ``parse_scored`` of
``orjson.loads`` (the reference): the same answer, bit for bit, or the same error, on a real
vLLM score body, the fake teacher's bodies at several K and prompt splits, and byte edits."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fake_teacher import FakeTeacher
from test_fuzz_real import EDITS, edited

from schemas.wire import Answer
from workers.answers import fastparse
from workers.errors import InvalidResponse, MissingLogprobs
from workers.teacher.score import Scored, parse_batch, parse_scored, read_batch, read_scored

REAL = Path(__file__).resolve().parents[2] / "data" / "vllm-score" / "score_ids_k5.json"


@pytest.fixture(autouse=True)
def compiled() -> None:
    assert fastparse.compiled is not None, "workers.answers._topk was not built"


def outcome(read: Any, raw: bytes, scored: Scored, k: int) -> Answer | tuple[type, str]:
    try:
        return read(raw, scored, k)
    except (InvalidResponse, MissingLogprobs) as err:
        return type(err), str(err)


def reference(raw: bytes, scored: Scored, k: int) -> Answer:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidResponse(f"body is not JSON: {err}") from None
    return parse_scored(body, scored, k)


def agree(raw: bytes, scored: Scored, k: int) -> Answer | tuple[type, str]:
    ours, ref = outcome(read_scored, raw, scored, k), outcome(reference, raw, scored, k)
    if isinstance(ref, Answer):
        assert isinstance(ours, Answer), (ours, raw[:200])
        a, b = ours.samples[0], ref.samples[0]
        assert ours.prompt_token_ids == ref.prompt_token_ids
        assert list(a.token_ids) == list(b.token_ids) and a.loss_mask == b.loss_mask
        for x, y in ((a.logprobs, b.logprobs), (a.top_token_ids, b.top_token_ids),
                     (a.top_logprobs, b.top_logprobs)):  # fmt: skip
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            assert x.shape == y.shape and x.tobytes() == y.tobytes()
    else:
        assert ours == ref
    return ref


def fake_body(ids: list[int], k: int) -> bytes:
    body = {"model": "fake", "prompt": ids, "max_tokens": 1, "prompt_logprobs": k}
    body["return_token_ids"] = True
    return orjson.dumps(FakeTeacher().answer(body))


def test_a_real_vllm_score_body_reads_the_same_both_ways():
    raw = REAL.read_bytes()
    ids = orjson.loads(raw)["choices"][0]["prompt_token_ids"]
    for start in (1, 4, len(ids) - 1):
        scored = Scored(ids, [False] * start + [True] * (len(ids) - start), "r", start)
        assert isinstance(agree(raw, scored, 5), Answer)
        assert fastparse.scan_prompt(raw, ids, start, 5) is not None  # the fast path was taken


@pytest.mark.parametrize("k", [0, 1, 3, 20])
def test_fake_bodies_at_any_k_and_split(k):
    rng = random.Random(k)
    for _ in range(20):
        ids = [rng.randrange(100) for _ in range(rng.randrange(2, 40))]
        start = rng.randrange(1, len(ids))
        raw = fake_body(ids, k)
        scored = Scored(ids, [None] * len(ids), "", start)
        assert isinstance(agree(raw, scored, k), Answer)
        assert fastparse.scan_prompt(raw, ids, start, k) is not None


def test_shapes_the_fast_path_leaves_to_the_checked_path():
    ids = [5, 6, 7, 8]
    scored = Scored(ids, [None] * 4, "", 1)
    good = orjson.loads(fake_body(ids, 3))
    plp = good["choices"][0]["prompt_logprobs"]
    cases = []
    for edit in (
        lambda p: p.__setitem__(0, {}),  # the first entry is not null
        lambda p: p.pop(),  # shorter than the sequence
        lambda p: p[1].pop(next(iter(p[1]))),  # K - 1 keys (or the actual token lost)
        lambda p: p[2].__setitem__("x1", {"logprob": -1.0}),  # not a token id
        lambda p: p[2].__setitem__(str(ids[2]), {"logprob": 0}),  # an integer logprob
        lambda p: p[3].__setitem__(str(ids[3]), {"logprob": -1.0, "extra": []}),
    ):
        body = orjson.loads(orjson.dumps(good))
        edit(body["choices"][0]["prompt_logprobs"])
        cases.append(orjson.dumps(body))
    twice = orjson.dumps(good).replace(b'"usage"', b'"prompt_logprobs":[null],"usage"')
    cases.append(twice)
    # A forged marker: the real array under a literal key, the marker string under an escaped
    # duplicate that orjson decodes to the same key (the last one wins there).
    forged = orjson.dumps(good).replace(
        b'"prompt_token_ids"', b'"prompt\\u005flogprobs":"\\u0000p0","prompt_token_ids"'
    )
    assert b"u005f" in forged
    cases.append(forged)
    for raw in cases:
        agree(raw, scored, 3)
    assert plp[0] is None


def test_random_byte_edits_read_the_same_or_fail_the_same():
    ids = list(range(3, 30))
    raw = fake_body(ids, 4)
    scored = Scored(ids, [None] * len(ids), "", 5)
    rng = random.Random(7)
    alphabet = b'0123456789-.eE":,{}[] nul\\x'
    for _ in range(1500):
        data = bytearray(raw)
        for _ in range(rng.randrange(1, 3)):
            data[rng.randrange(len(data))] = rng.choice(alphabet)
        agree(bytes(data), scored, 4)


# --- batches: one answer, a choice per sequence --------------------------------------------------

BATCH = REAL.parent / "score_batch3_k5.json"  # vLLM's answer to three token-id prompts


def batch_outcome(read: Any, raw: bytes, batch: list[Scored]) -> list[Answer] | tuple[type, str]:
    try:
        return read(raw, batch, 5)
    except (InvalidResponse, MissingLogprobs) as err:
        return type(err), str(err)


def batch_reference(raw: bytes, batch: list[Scored], k: int) -> list[Answer]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidResponse(f"body is not JSON: {err}") from None
    return parse_batch(body, batch, k)


def test_a_real_vllm_batch_body_reads_the_same_both_ways_and_under_edits():
    raw = BATCH.read_bytes()
    seqs = [c["prompt_token_ids"] for c in orjson.loads(raw)["choices"]]
    assert [len(s) for s in seqs] == [13, 1, 23]  # a one-token sequence has nothing to score
    batch = [Scored(s, [None] * len(s), "", min(3, len(s))) for s in seqs]
    assert fastparse.scan_prompts(raw, [(s.ids, s.start) for s in batch], 5) is not None
    rng = random.Random(11)
    kinds = {"answer": 0, "error": 0}
    bodies = [raw] + [edited(rng, raw, raw.index(b"prompt_logprobs")) for _ in range(EDITS)]
    for data in bodies:
        ours = batch_outcome(read_batch, data, batch)
        ref = batch_outcome(batch_reference, data, batch)
        if isinstance(ref, list):
            assert isinstance(ours, list), (ours, data[:200])
            for a, b in zip(ours, ref, strict=True):
                x, y = a.samples[0], b.samples[0]
                assert list(x.token_ids) == list(y.token_ids)
                for u, v in ((x.logprobs, y.logprobs), (x.top_token_ids, y.top_token_ids),
                             (x.top_logprobs, y.top_logprobs)):  # fmt: skip
                    assert (
                        np.asarray(u, np.float64).tobytes() == np.asarray(v, np.float64).tobytes()
                    )
            kinds["answer"] += 1
        else:
            assert ours == ref
            kinds["error"] += 1
    assert kinds["error"] > EDITS // 10 and kinds["answer"] > EDITS // 20
