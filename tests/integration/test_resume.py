"""Nothing lost, nothing duplicated: kill the driver, kill a worker, stop gracefully, resume.

Each run is the real `harvest` console script joined to the session's Ray cluster, against the
real vLLM server; the reference is an uninterrupted run of the same job.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_harvest_e2e import write_job

from harvest import reader
from harvest.manifest import MANIFEST

pytestmark = pytest.mark.integration

PROMPTS = 160
SHARD_ROWS = 10  # 5 prompts per unit at n=2: 32 units


def make_job(folder: Path, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "prompts.jsonl", "w") as fh:
        for i in range(PROMPTS):
            row = (
                {"prompt": f"Item {i}:"}
                if i % 3
                else {"id": f"c{i}", "messages": [{"role": "user", "content": f"Tell me {i}"}]}
            )
            fh.write(json.dumps(row) + "\n")
    return write_job(
        folder,
        url,
        sampling={"max_tokens": 32, "n": 2, "logprobs": 5, "seed": 5},
        output={"dir": "out", "rows_per_shard": SHARD_ROWS},
        concurrency={"workers": 2, "in_flight_per_endpoint": 8, "worker_cpus": 0.25},
    )


def start(job: Path, ray_address: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.Popen(
        [sys.executable, "-m", "harvest.cli", "run", str(job), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def committed_units(out: Path) -> int:
    path = out / MANIFEST
    if not path.exists():
        return 0
    return sum(b'"kind":"unit"' in line for line in path.read_bytes().splitlines())


def wait_for_units(proc: subprocess.Popen, out: Path, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while committed_units(out) < count:
        assert proc.poll() is None, f"harvest ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def request_ids(out: Path) -> list[str]:
    return reader.read_table(out)["request_id"].to_pylist()


CONTENT = ("response", "prompt_token_ids", "token_ids", "logprobs", "top_token_ids", "top_logprobs")


def contents(out: Path) -> dict[str, dict]:
    """request_id -> what the teacher answered (seeded: a resumed run must get the same)."""
    table = reader.read_table(out).select(["request_id", *CONTENT]).to_pylist()
    return {row.pop("request_id"): row for row in table}


def assert_same_content(out: Path, reference: dict[str, dict]) -> None:
    """Same rows as the clean run, each with the same tokens, logprobs and top-K."""
    got = contents(out)
    assert set(got) == set(reference)
    for rid, row in got.items():
        want = reference[rid]
        for col in ("response", "prompt_token_ids", "token_ids", "top_token_ids"):
            assert row[col] == want[col], (rid, col)
        # float32 in the shard; allow only the last bits a different batch could move
        assert row["logprobs"] == pytest.approx(want["logprobs"], abs=1e-5), rid
        flat = [v for top in row["top_logprobs"] for v in top]
        assert flat == pytest.approx([v for top in want["top_logprobs"] for v in top], abs=1e-5)


def all_shard_ids(out: Path) -> list[str]:
    """Every data file on disk, committed or not: what a glob-reading trainer would see."""
    return [
        i
        for p in sorted((out / "data").glob("*.parquet"))
        for i in pq.read_table(p)["request_id"].to_pylist()
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher, ray_cluster) -> dict[str, dict]:
    """The clean, uninterrupted run: request_id -> the teacher's answer."""
    job = make_job(tmp_path_factory.mktemp("clean"), tiny_teacher)
    proc = start(job, ray_cluster)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    ids = request_ids(job.parent / "out")
    assert len(ids) == len(set(ids)) == PROMPTS * 2
    return contents(job.parent / "out")


@pytest.mark.parametrize("kill_point", [0, 1, 2])
def test_driver_sigkill_then_resume_gives_the_clean_row_set(
    kill_point, reference, tmp_path, tiny_teacher, ray_cluster
):
    rng = random.Random(1000 + kill_point)
    job = make_job(tmp_path, tiny_teacher)
    out = tmp_path / "out"
    proc = start(job, ray_cluster)
    wait_for_units(proc, out, rng.choice([[1, 3], [8, 12], [18, 24]][kill_point]))
    time.sleep(rng.uniform(0, 0.3))  # land anywhere inside a unit, or a manifest write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < committed_units(out) < PROMPTS * 2 // SHARD_ROWS

    resumed = start(job, ray_cluster)
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    ids = request_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == set(reference)
    assert Counter(all_shard_ids(out)) == Counter(list(reference))  # no stale or partial shard
    assert_same_content(out, reference)
    assert not list(out.rglob(".tmp-*"))


def harvest_actor_pids() -> list[int]:
    """Worker processes of harvest actors (Ray titles them ``ray::HarvestActor...``)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::HarvestActor"):
            pids.append(p.info["pid"])
    return pids


def test_worker_sigkill_mid_job_reruns_its_unit(reference, tmp_path, tiny_teacher, ray_cluster):
    job = make_job(tmp_path, tiny_teacher)
    out = tmp_path / "out"
    proc = start(job, ray_cluster)
    wait_for_units(proc, out, 2)
    pids = harvest_actor_pids()
    assert pids, "no harvest actor process found"
    os.kill(pids[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["worker_restarts"] >= 1
    ids = request_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == set(reference)
    assert_same_content(out, reference)
    units = [json.loads(x) for x in (out / MANIFEST).read_text().splitlines()]
    unit_ids = [u["unit_id"] for u in units if u["kind"] == "unit"]
    assert len(unit_ids) == len(set(unit_ids))  # each unit committed exactly once


def test_sigterm_stops_gracefully_and_resumes(reference, tmp_path, tiny_teacher, ray_cluster):
    job = make_job(tmp_path, tiny_teacher)
    out = tmp_path / "out"
    proc = start(job, ray_cluster)
    wait_for_units(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "resume with: harvest run" in stdout and "Traceback" not in stderr
    done = committed_units(out)
    assert 3 <= done < PROMPTS * 2 // SHARD_ROWS  # it stopped dispatching
    assert len(request_ids(out)) == done * SHARD_ROWS  # in-flight units finished and committed

    resumed = start(job, ray_cluster)
    resumed.communicate(timeout=600)
    assert resumed.returncode == 0
    ids = request_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == set(reference)
    assert_same_content(out, reference)
