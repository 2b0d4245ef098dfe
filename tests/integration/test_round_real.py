"""On-policy rounds against real vLLM servers: the student samples, the teacher scores its ids.

With the student the teacher itself, the teacher's logprob of every sampled token must equal
the one the student stored while sampling it: the ids were scored as sampled. With a student
that differs (the tiny Llama with noise on its weights, served by a managed replica of the
job), the teacher's stored top-K must equal a transformers forward of the teacher over the
student's exact ids; that student's server is killed once a unit is committed, and the round
must end complete on the replica Ray restarts. A student whose tokenizer differs is refused
before any prompt is sent.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import jobs
import pytest
from fault_teacher_server import FaultTeacherServer
from jobs import AUTH
from test_harvest_e2e import write_job
from test_replicas import replica_servers
from test_resume import start, wait_for_units

from harvest.cli import main
from harvest.outputs.provenance import report
from harvest.training import reader
from workers.shards.columns import read_metadata

pytestmark = pytest.mark.integration

K, N, ROWS = 5, 2, 10
MANAGED_ROWS = 80  # enough that the round is still running when its student is killed
ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ROOT / "tests" / "data" / "tiny-llama"
STUDENT_MODEL = ROOT / ".cache" / "tiny-student-perturbed"


def round_job(folder: Path, teacher: str, student: dict, rows: int = ROWS) -> Path:
    with open(folder / "prompts.jsonl", "w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": f"p{i}", "prompt": f"Round {i} says"}) + "\n")
        chat = [{"role": "user", "content": "Hi there"}]
        fh.write(json.dumps({"id": "chat", "messages": chat}) + "\n")
    return write_job(
        folder, teacher, mode="round",
        student=student,
        sampling={"max_tokens": 12, "n": N, "logprobs": K, "seed": 5, "temperature": 1.0},
        output={"dir": "out", "rows_per_shard": 4},
    )  # fmt: skip


def build_perturbed_student(dest: Path, seed: int = 21, scale: float = 0.3) -> Path:
    """The tiny Llama with seeded noise on every weight: another model, the same tokenizer.

    Built once under .cache/ (a few hundred KB) for on-policy round tests."""
    if (dest / "model.safetensors").exists():
        return dest
    import shutil

    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_MODEL / name, tmp / name)
    tmp.rename(dest)
    return dest


def managed_student() -> dict:
    """The perturbed tiny Llama as one managed replica of the job, served as "student"."""
    return jobs.managed("student", build_perturbed_student(STUDENT_MODEL), 1, outage_timeout_s=1800)


def records(out: Path) -> list[dict]:
    return reader.read_table(out).to_pylist()


@pytest.fixture(scope="module")
def same(tmp_path_factory, tiny_teacher, ray_cluster) -> Path:
    folder = tmp_path_factory.mktemp("round-same")
    job = round_job(folder, tiny_teacher, jobs.model("tiny", tiny_teacher))
    assert main(["run", str(job), "--no-progress"]) == 0
    return folder / "out"


def test_a_round_with_the_teacher_as_student_scores_the_ids_as_sampled(same):
    recs = records(same)
    assert sorted((r["prompt_id"], r["sample_index"]) for r in recs) == sorted(
        (p, s) for p in [*(f"p{i}" for i in range(ROWS)), "chat"] for s in range(N)
    )
    assert len({r["request_id"] for r in recs}) == len(recs)
    worst = 0.0
    for r in recs:
        assert len(r["student_logprobs"]) == len(r["logprobs"]) == len(r["token_ids"]) > 0
        assert all(len(t) == K for t in r["top_token_ids"])
        assert r["finish_reason"] in ("length", "stop")
        for a, b in zip(r["logprobs"], r["student_logprobs"], strict=True):
            worst = max(worst, abs(a - b))
    assert worst < 1e-4, f"teacher and student logprobs differ by up to {worst}"
    meta = read_metadata(reader.data_files(same)[0])
    assert meta["mode"] == "round" and meta["student"]["model"] == "tiny"
    assert meta["student_authorization"]["owner"] == AUTH["owner"]
    assert meta["teacher"]["tokenizer_hash"] == meta["student"]["tokenizer_hash"]
    assert reader.data_files(same, "failed") == []
    text, agreed = report(same)
    assert agreed and "student:         tiny" in text and "mode:            round" in text


def test_a_rerun_of_a_round_resumes_and_changes_nothing(same):
    before = reader.read_table(same).sort_by("request_id")
    assert main(["run", str(same.parent / "job.yaml"), "--no-progress"]) == 0
    assert reader.read_table(same).sort_by("request_id").equals(before)


@pytest.fixture(scope="module")
def other(tmp_path_factory, tiny_teacher, ray_cluster) -> Path:
    """The round with the managed student, whose server is killed (SIGKILL, as a crash) once
    the first unit is committed: the rows left wait for Ray to restart the replica."""
    folder = tmp_path_factory.mktemp("round-other")
    job = round_job(folder, tiny_teacher, managed_student(), rows=MANAGED_ROWS)
    out = folder / "out"
    proc = start(job, ray_cluster)
    try:
        wait_for_units(proc, out, 1, timeout=900)
        (server,) = replica_servers("student")
        os.kill(server.pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    return out


def test_a_killed_student_replica_is_restarted_and_the_round_ends_complete(other):
    recs = records(other)
    keys = sorted((r["prompt_id"], r["sample_index"]) for r in recs)
    assert keys == sorted(
        (p, s) for p in [*(f"p{i}" for i in range(MANAGED_ROWS)), "chat"] for s in range(N)
    )
    assert reader.data_files(other, "failed") == []
    log = [json.loads(line) for line in (other / "_harvest" / "log.jsonl").open()]
    down = [e for e in log if e["event"] == "replica_down"]
    back = [e for e in log if e["event"] == "replica_back"]
    assert [e.get("role") for e in down] == ["student"], down
    assert [e.get("role") for e in back] == ["student"], back
    assert log.index(down[0]) < log.index(back[0])
    assert down[0]["message"].startswith("student replica 0")


def test_the_teachers_top_k_over_another_students_ids_equal_a_forward(other):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)
    model.eval()
    differs = 0
    for r in records(other):
        ids = r["prompt_token_ids"] + r["token_ids"]
        with torch.no_grad():
            lsm = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        p = len(r["prompt_token_ids"])
        for j, tid in enumerate(r["token_ids"]):
            dist = lsm[p + j - 1]
            top = dist.topk(K)
            assert r["top_token_ids"][j] == top.indices.tolist()
            for a, b in zip(r["top_logprobs"][j], top.values.tolist(), strict=True):
                assert math.isclose(a, b, abs_tol=1e-4)
            assert math.isclose(r["logprobs"][j], float(dist[tid]), abs_tol=1e-4)
            differs += abs(r["student_logprobs"][j] - r["logprobs"][j]) > 1e-2
    assert differs, "the student is not a different model: its logprobs equal the teacher's"
    meta = read_metadata(reader.data_files(other)[0])
    assert meta["student"]["model"] == "student" and meta["teacher"]["model"] == "tiny"


def test_a_student_with_another_tokenizer_is_refused_at_preflight(
    tmp_path, tiny_teacher, ray_cluster, capsys
):
    with FaultTeacherServer(model="toy-student") as student:
        job = round_job(tmp_path, tiny_teacher, jobs.model("toy-student", student.url))
        assert main(["run", str(job), "--no-progress"]) == 2
        sent = [r for r in student.log if r.path == "/v1/completions"]
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not sent
    assert err.startswith("harvest: error: student 'toy-student' and teacher 'tiny' tokenise")
    assert not (tmp_path / "out" / "data").exists() or not reader.data_files(tmp_path / "out")
