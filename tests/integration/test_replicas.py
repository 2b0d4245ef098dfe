"""Managed teacher replicas: the job launches vLLM servers as Ray actors and routes across them.

Two CPU replicas of the tiny model on the session's Ray cluster; the second test kills one
replica's server mid-job: Ray restarts the replica on a new port, the restarted server must
serve the rest of the job beside the survivor (its URL in the summary's per-endpoint counts),
the status file and the log must say how long it was away, and every prompt must end exactly
once. However slow the restart on a busy machine, the job cannot end without it: the survivor
is paused (SIGSTOP) until the restarted replica has answered, so meanwhile the rows wait for
the one that comes back; the test waits on the status file, not on a clock.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import jobs
import psutil
import pytest
from test_resume import committed_units, start

from harvest.training import reader

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVED = "tiny-managed"


def replica_job(folder: Path, prompts: int, max_tokens: int, **teacher: object) -> Path:
    with open(folder / "prompts.jsonl", "w") as fh:
        for i in range(prompts):
            row = (
                {"prompt": f"Managed {i}:"}
                if i % 2
                else {"messages": [{"role": "user", "content": f"Replica question {i}"}]}
            )
            fh.write(json.dumps(row) + "\n")
    replicas = jobs.managed(SERVED, ROOT / "tests" / "data" / "tiny-llama", 2, **teacher)
    job = jobs.job(
        replicas,
        "prompts.jsonl",
        sampling={"max_tokens": max_tokens, "n": 2, "logprobs": 5, "seed": 3},
        output={"dir": "out", "rows_per_shard": 20},
        concurrency={"workers": 2, "in_flight_per_endpoint": 8, "worker_cpus": 0.25},
    )
    return jobs.write_job(folder, job)


def replica_servers(served: str = SERVED) -> list[psutil.Process]:
    """The vLLM API servers of the replicas serving ``served`` (their engines not included)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "--served-model-name" in cmd and served in cmd and "--port" in cmd:
            found.append(p)
    return found


def vllm_processes() -> set[int]:
    """Every vLLM process here: API servers and their engine processes."""
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("VLLM::") or "vllm.entrypoints" in cmd:
            found.add(p.info["pid"])
    return found


def assert_no_leftovers(before: set[int]) -> None:
    """The job's servers, engines included, are gone (the session's own server stays)."""
    deadline = time.monotonic() + 45
    while vllm_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert vllm_processes() - before == set()


def check_rows(out: Path, prompts: int) -> None:
    table = reader.read_table(out)
    keys = list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == prompts * 2
    assert reader.data_files(out, "failed") == []


def test_two_managed_replicas_share_the_work(tmp_path, ray_cluster):
    before = vllm_processes()
    job = replica_job(tmp_path, prompts=80, max_tokens=16)
    proc = start(job, ray_cluster)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    served = summary["this_run"]["requests_by_endpoint"]
    assert len(served) == 2 and all(count > 0 for count in served.values()), served
    assert sum(served.values()) == 80
    assert "prompts answered by http://127.0.0.1:" in stdout
    check_rows(tmp_path / "out", 80)
    assert sorted(p.name for p in (tmp_path / "out" / "_replicas").iterdir())  # server logs kept
    assert_no_leftovers(before)  # stopped with the job


def read_status(out: Path) -> dict:
    try:
        return json.loads((out / "_harvest" / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet
        return {}


def test_killed_replica_is_restarted_and_serves_again(tmp_path, ray_cluster):
    before = vllm_processes()
    prompts = 300
    job = replica_job(tmp_path, prompts=prompts, max_tokens=16, outage_timeout_s=1800)
    out = tmp_path / "out"
    proc = start(job, ray_cluster)
    deadline = time.monotonic() + 900
    while committed_units(out) < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    servers = replica_servers()
    assert len(servers) == 2
    cmd = servers[0].cmdline()
    killed = cmd[cmd.index("--port") + 1]
    os.kill(servers[0].pid, signal.SIGKILL)  # the server, not the actor: a crash under load
    survivor = servers[1]
    survivor.suspend()  # the job now needs the restarted replica to go on
    try:
        back: dict = {}
        while not back:
            assert proc.poll() is None, "the job ended before the restarted replica answered"
            assert time.monotonic() < deadline
            back = next((r for r in read_status(out).get("replicas", [])
                         if r["first_answer_after_s"] is not None), {})  # fmt: skip
            time.sleep(0.5)
    finally:
        survivor.resume()
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    new_url = back["url"]
    assert f":{killed}/" not in new_url and back["restarts"] == 1
    assert 0 < back["healthy_after_s"] <= back["first_answer_after_s"]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["this_run"]["replica_restarts"] >= 1, stdout
    served = summary["this_run"]["requests_by_endpoint"]
    assert served.get(new_url, 0) > 0, served  # the restarted replica served rows
    assert sum(served.values()) == prompts  # each row answered once, by one of the three
    check_rows(out, prompts)
    log = [json.loads(line) for line in (out / "_harvest" / "log.jsonl").open()]
    events = [e["event"] for e in log if e["event"].startswith("replica_")]
    assert events[:1] == ["replica_down"] and "replica_back" in events, events
    assert events.index("replica_back") < events.index("replica_answers"), events
    status = read_status(out)
    assert any(r["url"] == new_url and r["first_answer_after_s"] for r in status["replicas"])
    assert_no_leftovers(before)  # the killed server's engine and the restarted replica too
