"""Nothing lost, nothing duplicated: kill the driver, kill a worker, stop gracefully, resume.

Each run is the real `harvest` console script joined to the session's Ray cluster, against the
real vLLM server; the reference is an uninterrupted run of the same job. The driver-kill test
runs on a local folder and on a real S3 server through the same commit protocol.
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

from harvest.outputs.manifest import COMMITS, load, parse_record
from harvest.training import reader
from workers.storage import open_store

pytestmark = pytest.mark.integration

PROMPTS = 160
SHARD_ROWS = 10  # 5 prompts per unit at n=2: 32 units


def make_job(folder: Path, url: str, out: str = "out") -> Path:
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
        output={"dir": out, "rows_per_shard": SHARD_ROWS},
        concurrency={"workers": 2, "in_flight_per_endpoint": 8, "worker_cpus": 0.25},
    )


LEASE_TTL_S = "3"  # a killed driver's lease may be taken over 3 s after its last renewal


def start(
    job: Path, ray_address: str, *options: str, lease_ttl_s: str = LEASE_TTL_S
) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_address, "HARVEST_LEASE_TTL_S": lease_ttl_s}
    return subprocess.Popen(
        [sys.executable, "-m", "harvest.cli", "run", str(job), "--no-progress", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def committed_units(out: str | Path) -> int:
    return len(open_store(str(out)).list(COMMITS))


def wait_for_units(
    proc: subprocess.Popen, out: str | Path, count: int, timeout: float = 300
) -> None:
    deadline = time.monotonic() + timeout
    while committed_units(out) < count:
        assert proc.poll() is None, f"harvest ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def run_after_lease_expires(job: Path, ray_address: str, dead_pid: int) -> str:
    """Rerun until the killed driver's lease has expired: every refusal must name that driver,
    and the run that starts must finish. Returns its stderr."""
    while True:
        proc = start(job, ray_address)
        _, stderr = proc.communicate(timeout=600)
        if proc.returncode == 2 and "is in use by another harvest driver" in stderr:
            assert f"pid {dead_pid} on " in stderr and len(stderr.strip().splitlines()) == 1
            time.sleep(0.5)
            continue
        assert proc.returncode == 0, stderr
        return stderr


def request_ids(out: str | Path) -> list[str]:
    return reader.read_table(out)["request_id"].to_pylist()


CONTENT = ("response", "prompt_token_ids", "token_ids", "logprobs", "top_token_ids", "top_logprobs")


def contents(out: str | Path) -> dict[str, dict]:
    """request_id -> what the teacher answered (seeded: a resumed run must get the same)."""
    table = reader.read_table(out).select(["request_id", *CONTENT]).to_pylist()
    return {row.pop("request_id"): row for row in table}


def assert_same_content(out: str | Path, reference: dict[str, dict]) -> None:
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


def all_shard_ids(out: str | Path) -> list[str]:
    """Every data object stored, committed or not: what a glob-reading trainer would see."""
    store = open_store(str(out))
    ids = []
    for name in store.list("data"):
        with store.open_input_file(name) as fh:
            ids += pq.read_table(fh)["request_id"].to_pylist()
    return ids


def plant_orphan(out: str) -> str:
    """A well-formed shard no commit names (a copy of a committed one): must never be read."""
    store = open_store(out)
    with store.open_input_file(load(store).shard_paths()[0]) as fh:
        table = pq.read_table(fh)
    name = "data/part-planted-orphan-0000.parquet"
    store.write_table(table, name, "zstd")
    return name


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


@pytest.mark.parametrize(
    ("storage", "kill_point"), [("local", 0), ("local", 1), ("local", 2), ("s3", 1)]
)
def test_driver_sigkill_then_resume_gives_the_clean_row_set(
    storage, kill_point, reference, tmp_path, tiny_teacher, ray_cluster, request
):
    rng = random.Random(1000 + kill_point)
    out = str(tmp_path / "out") if storage == "local" else request.getfixturevalue("s3_prefix")
    job = make_job(tmp_path, tiny_teacher, out)
    proc = start(job, ray_cluster)
    wait_for_units(proc, out, rng.choice([[1, 3], [8, 12], [18, 24]][kill_point]))
    time.sleep(rng.uniform(0, 0.3))  # land anywhere inside a unit, or a commit write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < committed_units(out) < PROMPTS * 2 // SHARD_ROWS
    orphan = plant_orphan(out)
    before = request_ids(out)
    assert len(before) == len(set(before))  # the planted copy is not read

    run_after_lease_expires(job, ray_cluster, proc.pid)
    ids = request_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == set(reference)
    assert_same_content(out, reference)  # seeded sampling: the very same tokens
    assert Counter(all_shard_ids(out)) == Counter(list(reference))  # nothing stale or planted
    store = open_store(out)
    assert not store.exists(orphan)
    assert not [n for n in store.list() if n.rsplit("/", 1)[-1].startswith(".tmp-")]
    assert not store.exists("_harvest/lease.json")  # released at the end


def harvest_actor_pids() -> list[int]:
    """Worker processes of harvest actors (Ray titles them ``ray::HarvestActor...``) of this
    session's cluster only: its raylet is our child, so they are our descendants. A harvest
    someone else runs on a shared machine is not ours to kill."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].startswith("ray::HarvestActor"):
            pids.append(p.pid)
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
    assert summary["this_run"]["worker_restarts"] >= 1
    ids = request_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == set(reference)
    assert_same_content(out, reference)
    store = open_store(str(out))
    unit_ids = [parse_record(store.read_bytes(n)).unit_id for n in store.list(COMMITS)]
    assert len(unit_ids) == len(set(unit_ids)) == PROMPTS * 2 // SHARD_ROWS  # each unit once
    assert Counter(all_shard_ids(out)) == Counter(list(reference))  # dead attempt: swept


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
