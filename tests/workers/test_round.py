"""A round in the worker: the student's samples scored by the teacher, one record per sample."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import jobs
import pyarrow.parquet as pq
from fake_teacher import FakeTeacher

from schemas.wire import PromptRow, RowProblem, WorkUnit
from workers.round import RoundClients
from workers.storage import open_store
from workers.teacher.client import TeacherClient
from workers.unit import harvest_unit

K, N = 3, 2


def model(name: str) -> dict[str, Any]:
    return jobs.model(
        name, f"http://{name}:8000", backoff_initial_s=0.01, backoff_max_s=0.02, max_attempts=2
    )


def round_spec() -> Any:
    return jobs.spec(
        model("teacher"),
        mode="round",
        student=model("student"),
        sampling={"logprobs": K, "n": N, "max_tokens": 5, "seed": 1},
    )


def run(tmp_path, rows, teacher_script=None):
    spec = round_spec()
    student, teacher = FakeTeacher("student"), FakeTeacher("teacher", script=teacher_script)

    async def go():
        clients = RoundClients(
            TeacherClient(spec.student_job(), job_id="j", transport=student.transport()),
            TeacherClient(spec.teacher_job(), job_id="j", transport=teacher.transport()),
        )
        try:
            unit = WorkUnit("u-0", rows)
            return await harvest_unit(unit, clients, spec, open_store(str(tmp_path)), {})
        finally:
            await clients.student.aclose()
            await clients.teacher.aclose()

    result = asyncio.run(go())
    return result, student, teacher


def test_every_sample_is_scored_on_the_students_exact_ids(tmp_path):
    rows = [PromptRow(f"p{i}", f"x:{i}", prompt=f"prompt {i}") for i in range(3)]
    result, student, teacher = run(tmp_path, rows)
    data = pq.read_table(tmp_path / result.data_path).to_pylist()
    assert sorted((r["prompt_id"], r["sample_index"]) for r in data) == [
        (f"p{i}", s) for i in range(3) for s in range(N)
    ]
    sampled = [b for _, path, b, _ in student.calls if path.endswith("/completions")]
    scored = [b for _, path, b, _ in teacher.calls if path.endswith("/completions")]
    assert all(b["logprobs"] == 0 and b["n"] == N for b in sampled)  # the student's sampling
    assert len(scored) == 3 * N and all(b["prompt_logprobs"] == K for b in scored)
    assert not any(path.endswith("/tokenize") for _, path, _, _ in teacher.calls)
    for r in data:
        assert {tuple(b["prompt"]) for b in scored} >= {
            tuple(r["prompt_token_ids"] + r["token_ids"])
        }  # the teacher was sent exactly the student's prompt and sampled ids
        assert len(r["student_logprobs"]) == len(r["token_ids"]) == len(r["logprobs"]) == 5
        assert r["student_logprobs"] != r["logprobs"]  # two models: the fakes differ
        assert r["finish_reason"] == "length" and r["teacher"] == "teacher"
    assert len({r["request_id"] for r in data}) == len(data)


def test_a_sample_the_teacher_cannot_score_is_one_failure_record(tmp_path):
    refused: list[int] = []

    def refuse_one(body, call):  # the teacher rejects the first score request it gets
        if "prompt_logprobs" in body and not refused:
            refused.append(call)
            return httpx.Response(400, json={"error": {"message": "too long"}})
        return None

    rows = [PromptRow("p0", "x:1", prompt="prompt 0"), RowProblem("bad", "x:2", "no prompt")]
    result, _, _ = run(tmp_path, rows, refuse_one)
    data = pq.read_table(tmp_path / result.data_path).to_pylist()
    failed = pq.read_table(tmp_path / result.failed_path).to_pylist()
    assert len(data) == N - 1 and len(failed) == 1 + N  # one sample failed, the bad row n times
    by_pid = {}
    for f in failed:
        by_pid.setdefault(f["prompt_id"], []).append(f)
    assert [f["error_class"] for f in by_pid["p0"]] == ["BadRequest"]
    assert {f["sample_index"] for f in by_pid["p0"]} | {data[0]["sample_index"]} == {0, 1}
    assert sorted(f["sample_index"] for f in by_pid["bad"]) == list(range(N))
    ids = {f["request_id"] for f in failed} | {r["request_id"] for r in data}
    assert len(ids) == len(failed) + len(data)
