"""harvest_unit: every row lands in exactly one shard, once per sample; one name per attempt."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_teacher import FakeTeacher, decode_prompt, encode_text, render_chat
from test_client import make_spec

from schemas.wire import Completion, PromptRow, RowProblem, Sample, WorkUnit, request_id
from workers.answers.tail import tail_logprob
from workers.errors import AuthError
from workers.shards.columns import read_metadata
from workers.storage import open_store
from workers.teacher.client import TeacherClient, sampling_for
from workers.unit import harvest_unit


def rows() -> list[PromptRow | RowProblem]:
    return [
        PromptRow("a", "in:1", prompt="first"),
        RowProblem("in:2", "in:2", "malformed JSON line", raw="{oops"),
        PromptRow("c", "in:3", messages=[{"role": "user", "content": "hi"}]),
        PromptRow("bad", "in:4", prompt="too long"),
        PromptRow("one", "in:5", prompt="single", overrides={"n": 1}),
    ]


def reject_too_long(body, n):
    if body.get("prompt") == "too long":
        return httpx.Response(400, json={"error": {"message": "prompt longer than context"}})
    return None


def harvest(tmp_path, fake, unit_rows=None, spec=None):
    spec = spec or make_spec()

    async def go():
        client = TeacherClient(spec, job_id="j", transport=fake.transport())
        try:
            unit = WorkUnit("u-000000", unit_rows or rows())
            return await harvest_unit(
                unit, client, spec, open_store(str(tmp_path)), {"job_id": "j"}
            )
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_each_row_lands_once_per_sample(tmp_path):
    result = harvest(tmp_path, FakeTeacher(script=reject_too_long))
    assert result.data_path.startswith("data/part-u-000000-")  # relative to the output root
    data_path, failed_path = tmp_path / result.data_path, tmp_path / result.failed_path
    data = pq.read_table(data_path).to_pylist()
    failed = pq.read_table(failed_path).to_pylist()
    assert sorted((r["prompt_id"], r["sample_index"]) for r in data) == [
        ("a", 0), ("a", 1), ("c", 0), ("c", 1), ("one", 0)
    ]  # fmt: skip
    assert sorted((r["prompt_id"], r["sample_index"], r["error_class"]) for r in failed) == [
        ("bad", 0, "BadRequest"), ("bad", 1, "BadRequest"),
        ("in:2", 0, "InvalidInput"), ("in:2", 1, "InvalidInput"),
    ]  # fmt: skip
    bad = next(r for r in failed if r["prompt_id"] == "bad")
    assert bad["http_status"] == 400 and "longer than context" in bad["message"]
    assert bad["prompt"] == "too long" and bad["attempts"] == 1
    assert next(r for r in failed if r["prompt_id"] == "in:2")["raw"] == "{oops"
    ids = [r["request_id"] for r in data + failed]
    assert len(set(ids)) == len(ids) == 9
    assert (result.data_rows, result.failure_rows, result.prompts) == (5, 4, 5)
    assert result.error_classes == {"BadRequest": 1, "InvalidInput": 1}
    meta = read_metadata(str(data_path))
    assert meta.pop("written_at").endswith("+00:00")
    assert meta.pop("topk_encoding") == {"name": "float32", "lossless": True}
    assert meta == {"job_id": "j", "unit_id": "u-000000", "kind": "data"}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [data_path.name, failed_path.name]
    )  # no temporary left behind


# request_id of prompt "a", sample 0, teacher "fake" under make_spec()'s sampling, as computed
# when resume was built. A resumed run, in another process or another harvest version, must
# derive the same ids, or it would harvest committed rows again under new ids.
GOLDEN_A0 = "8c514a02217709a2faa65beb8553f4ac"


def test_request_ids_are_stable_across_runs(tmp_path):
    result = harvest(tmp_path, FakeTeacher(script=reject_too_long))
    data = pq.read_table(tmp_path / result.data_path).to_pylist()
    by_key = {(r["prompt_id"], r["sample_index"]): r["request_id"] for r in data}
    assert by_key["a", 0] == GOLDEN_A0
    spec = make_spec()
    for row in rows():
        if isinstance(row, PromptRow) and row.prompt_id != "bad":
            for s in range(sampling_for(spec, row)["n"]):
                want = request_id(row.prompt_id, s, "fake", sampling_for(spec, row))
                assert by_key[row.prompt_id, s] == want
    # The row's own sampling is part of the id: "one" (n=1 override) differs from the job's n=2.
    assert by_key["one", 0] != request_id("one", 0, "fake", sampling_for(spec, PromptRow("", "")))
    # Another interpreter, with another hash seed, derives the same id.
    code = (
        "from schemas.wire import request_id; print(request_id('a', 0, 'fake', {'max_tokens': 6,"
        " 'temperature': 1.0, 'top_p': 1.0, 'n': 2, 'seed': 3, 'stop': []}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == GOLDEN_A0, out.stderr


def test_records_carry_the_prompt_ids_the_teacher_saw(tmp_path):
    fake = FakeTeacher(script=reject_too_long)
    result = harvest(tmp_path, fake)
    data = pq.read_table(tmp_path / result.data_path)
    assert data.schema.field("prompt_token_ids").nullable is False
    ids = {r["prompt_id"]: r["prompt_token_ids"] for r in data.to_pylist()}
    assert ids["a"] == encode_text("first") and ids["one"] == encode_text("single")
    assert ids["c"] == render_chat([{"role": "user", "content": "hi"}], True)
    assert decode_prompt(ids["c"]) == [{"role": "user", "content": "hi"}]


class NoPromptIds:
    """A client whose answers lack prompt ids: they cannot become records."""

    async def complete(self, row, ready=None, request=None):
        sample = Sample(0, "x", "length", [5], [-1.0], [[5, 6, 7]], [[-1.0, -2.0, -3.0]])
        return Completion([sample], 1, "http://t", attempts=2, latency_ms=1.0)


def test_an_answer_without_prompt_ids_is_a_failure_row(tmp_path):
    spec = make_spec()
    unit = WorkUnit("u-000000", [PromptRow("a", "in:1", prompt="x", overrides={"n": 1})])
    result = asyncio.run(harvest_unit(unit, NoPromptIds(), spec, open_store(str(tmp_path)), {}))
    (fail,) = pq.read_table(tmp_path / result.failed_path).to_pylist()
    assert (fail["error_class"], fail["attempts"], fail["endpoint"]) == (
        "MissingLogprobs",
        2,
        "http://t",
    )
    assert (result.data_rows, result.failure_rows) == (0, 1)


def test_each_attempt_writes_under_its_own_names(tmp_path):
    """A second attempt at a unit never overwrites the first (which may be committed)."""
    first = harvest(tmp_path, FakeTeacher(script=reject_too_long))
    good = [r for r in rows() if isinstance(r, PromptRow) and r.prompt_id != "bad"]
    second = harvest(tmp_path, FakeTeacher(), good)
    assert second.failure_rows == 0 and second.failed_path is None
    assert first.data_path != second.data_path
    assert (tmp_path / first.data_path).exists() and (tmp_path / first.failed_path).exists()
    assert len(list((tmp_path / "failed").iterdir())) == 1  # none written for the clean attempt


def test_fatal_error_stops_the_unit_without_writing(tmp_path):
    fake = FakeTeacher(script=lambda body, n: httpx.Response(401))
    with pytest.raises(AuthError):
        harvest(tmp_path, fake)
    assert not list(tmp_path.rglob("*.parquet"))


def test_float16_logprobs_are_the_float32_ones_rounded(tmp_path):
    fake = FakeTeacher()
    r32 = harvest(tmp_path / "32", fake)
    spec = make_spec()
    spec16 = spec.model_copy(
        update={"output": spec.output.model_copy(update={"logprob_dtype": "float16"})}
    )
    r16 = harvest(tmp_path / "16", fake, spec=spec16)
    t32 = pq.read_table(tmp_path / "32" / r32.data_path)
    t16 = pq.read_table(tmp_path / "16" / r16.data_path)
    assert t16.schema.field("top_logprobs").type.value_type.value_type == pa.float16()
    assert t16.schema.field("logprobs").type.value_type == pa.float16()
    for col in ("logprobs", "top_logprobs"):
        assert t16[col].cast(t32[col].type).equals(t32[col].cast(t16[col].type).cast(t32[col].type))
    for col in ("token_ids", "top_token_ids", "prompt_token_ids", "request_id"):
        assert t16[col].equals(t32[col])


def test_the_tail_mass_is_stored_from_full_precision_also_for_float16(tmp_path):
    """tail_logprob is computed by the worker before rounding: float16 shards carry the same
    float32 tail as float32 ones, and it matches the top-K values the shard holds."""
    fake = FakeTeacher()
    r32 = harvest(tmp_path / "32", fake)
    spec = make_spec()
    spec16 = spec.model_copy(
        update={"output": spec.output.model_copy(update={"logprob_dtype": "float16"})}
    )
    r16 = harvest(tmp_path / "16", fake, spec=spec16)
    t32 = pq.read_table(tmp_path / "32" / r32.data_path)
    t16 = pq.read_table(tmp_path / "16" / r16.data_path)
    assert t16.schema.field("tail_logprob").type.value_type == pa.float32()
    assert t16["tail_logprob"].equals(t32["tail_logprob"])
    assert t32["tail_logprob"].null_count == 0
    for tails, tops in zip(
        t32["tail_logprob"].to_pylist(), t32["top_logprobs"].to_pylist(), strict=True
    ):
        assert len(tails) == len(tops)
        want = tail_logprob(np.array(tops, dtype=np.float64).reshape(len(tops), -1))
        np.testing.assert_allclose(tails, want, rtol=1e-5, atol=1e-6)
