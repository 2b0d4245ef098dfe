"""harvest_unit: every row lands in exactly one shard, once per sample; shards are atomic."""

from __future__ import annotations

import asyncio

import httpx
import pyarrow.parquet as pq
import pytest
from fake_teacher import FakeTeacher
from test_client import make_spec

from schemas.wire import PromptRow, RowProblem, WorkUnit
from workers.client import TeacherClient
from workers.errors import AuthError
from workers.unit import harvest_unit, shard_paths
from workers.writer import read_metadata


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


def harvest(tmp_path, fake, unit_rows=None):
    spec = make_spec()

    async def go():
        client = TeacherClient(spec, job_id="j", transport=fake.transport())
        try:
            unit = WorkUnit("u-000000", unit_rows or rows())
            return await harvest_unit(unit, client, spec, tmp_path, {"job_id": "j"})
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_each_row_lands_once_per_sample(tmp_path):
    result = harvest(tmp_path, FakeTeacher(script=reject_too_long))
    data_path, failed_path = shard_paths(tmp_path, "u-000000")
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
    meta = read_metadata(data_path)
    assert meta.pop("written_at").endswith("+00:00")
    assert meta == {"job_id": "j", "unit_id": "u-000000", "kind": "data"}
    assert not list(tmp_path.rglob(".tmp-*"))


def test_request_ids_are_stable_across_runs(tmp_path):
    harvest(tmp_path / "one", FakeTeacher(script=reject_too_long))
    harvest(tmp_path / "two", FakeTeacher(script=reject_too_long))
    first, second = (
        sorted(pq.read_table(shard_paths(tmp_path / d, "u-000000")[0])["request_id"].to_pylist())
        for d in ("one", "two")
    )
    assert first == second


def test_rerun_without_failures_removes_a_stale_failure_shard(tmp_path):
    harvest(tmp_path, FakeTeacher(script=reject_too_long))
    assert shard_paths(tmp_path, "u-000000")[1].exists()
    good = [r for r in rows() if isinstance(r, PromptRow) and r.prompt_id != "bad"]
    result = harvest(tmp_path, FakeTeacher(), good)
    assert result.failure_rows == 0 and not shard_paths(tmp_path, "u-000000")[1].exists()


def test_fatal_error_stops_the_unit_without_writing(tmp_path):
    fake = FakeTeacher(script=lambda body, n: httpx.Response(401))
    with pytest.raises(AuthError):
        harvest(tmp_path, fake)
    assert not list(tmp_path.rglob("*.parquet"))
