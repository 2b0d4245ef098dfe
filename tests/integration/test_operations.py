"""Operating a harvest: status lines when piped, `harvest status` in every state, Ray metrics
that equal the run's counts, and a JSON run log that names every fault class seen.

The teacher is the fault-injecting server on 127.0.0.1 (real sockets); runs use the session's
Ray cluster, whose metrics port is known to the tests (``ray_metrics_url``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from fault_jobs import N, fault_job
from fault_teacher_server import FaultPlan, FaultTeacherServer

from harvest.cli import main
from harvest.training import reader
from harvest.watch.status import read_status

pytestmark = pytest.mark.integration

OUTCOME_CLASS = {
    "429": "RateLimited",
    "500": "ServerError",
    "503": "ServerError",
    "reset": "TeacherUnavailable",
    "stall": "TeacherTimeout",
    "truncated": "InvalidResponse",
    "malformed": "InvalidResponse",
    "400": "BadRequest",
}


def make_job(folder: Path, url: str, prompts: int, **teacher) -> Path:
    """Plain prompts "op 0", "op 1", ...; a 1 s timeout, so a stall of the plan is a timeout."""
    rows = [{"prompt": f"op {i}"} for i in range(prompts)]
    return fault_job(folder, url, rows, timeout_s=1.0, backoff_max_s=0.3, **teacher)


def bad_prompts(count: int) -> set[str]:
    return {f"op {i}" for i in range(0, 10 * count, 10)}


def harvest_cli(job: Path, ray_address: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "harvest.cli", "run", str(job), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RAY_ADDRESS": ray_address},
    )  # fmt: skip


def shard_rows(out: Path) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        sum(pq.read_metadata(f).num_rows for f in reader.data_files(out, kind))
        for kind in ("data", "failed")
    )


def status_text(out: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    return capsys.readouterr().out


def test_piped_run_prints_status_lines_and_a_summary_matching_the_shards(tmp_path, ray_cluster):
    prompts, bad = 150, 5
    plan = FaultPlan(latency_s=0.2, capacity=8, always_400=bad_prompts(bad))
    with FaultTeacherServer(model="fault", plan=plan) as server:
        job = make_job(tmp_path, server.url, prompts)
        proc = harvest_cli(job, ray_cluster, "--status-every", "0.5")
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr  # done, with failures
    lines = re.findall(r"^harvest: (\d+)/(\d+) prompts \([\d.]+%\), .* tok/s, \d+ in flight, "
                       r"\d+ retries, (\d+) failed", stderr, re.M)  # fmt: skip
    assert len(lines) >= 2, stderr
    done = [int(d) for d, total, _ in lines]
    assert done == sorted(done) and {t for _, t, _ in lines} == {str(prompts)}
    assert "\x1b[" not in stderr and "\r" not in stderr  # no bar drawn into a log
    data, failed = shard_rows(tmp_path / "out")
    assert (data, failed) == ((prompts - bad) * N, bad * N)
    assert f"data rows: {data}   failure rows: {failed}" in stdout
    assert "Token authentication" not in stderr and "Started a local Ray" not in stderr


def test_status_shows_running_stopped_stale_and_done(tmp_path, ray_cluster, capsys):
    prompts = 200
    out = tmp_path / "out"
    plan = FaultPlan(latency_s=0.2, capacity=4)
    with FaultTeacherServer(model="fault", plan=plan) as server:
        job = make_job(tmp_path, server.url, prompts)

        def running_driver() -> subprocess.Popen:
            proc = harvest_cli(job, ray_cluster, "--no-progress", "--status-every", "0.3")
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                try:
                    status = read_status(out)
                except (FileNotFoundError, ValueError):
                    status = None
                mine = status is not None and status.pid == proc.pid
                if mine and status.state == "running" and status.prompts_done > 0:
                    return proc
                time.sleep(0.1)

        proc = running_driver()
        text = status_text(out, capsys)
        first = text.splitlines()[0]
        assert first.endswith(": running") and f"pid {proc.pid}" in text
        done = int(re.search(r"prompts (\d+)/200", text).group(1))
        assert 0 < done < prompts

        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        assert proc.returncode == 130
        text = status_text(out, capsys)
        assert text.splitlines()[0].endswith(
            "stopped (interrupted by SIGINT/SIGTERM; rerun to resume)"
        )

        proc = running_driver()
        proc.kill()
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 60  # stale after three missed heartbeats of 0.3 s
        while "crashed (stale)" not in (text := status_text(out, capsys)).splitlines()[0]:
            assert text.splitlines()[0].endswith(": running") and time.monotonic() < deadline
            time.sleep(0.2)

        assert main(["run", str(job), "--no-progress"]) == 0
    text = status_text(out, capsys)
    assert text.splitlines()[0].endswith(": done")
    assert f"prompts {prompts}/{prompts} (100.0%), data rows {prompts * N}, failure rows 0" in text


def prometheus(url: str, job_id: str) -> dict[str, float]:
    """``name{label=value,...}`` -> value for this job's harvest_ metrics (Ray's own labels
    dropped)."""
    out: dict[str, float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        m = re.match(r"^(ray_harvest_\w+)\{(.*)\} (\S+)$", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
        if labels.get("job_id") != job_id:
            continue
        keep = ",".join(
            f"{k}={v}" for k, v in sorted(labels.items()) if k in ("outcome", "kind", "error_class")
        )
        key = f"{m.group(1)}{{{keep}}}"
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def test_metrics_from_ray_match_the_run(tmp_path, ray_cluster, ray_metrics_url):
    prompts, bad = 120, 4
    plan = FaultPlan(rate_503=0.1, always_400=bad_prompts(bad), seed=3)
    with FaultTeacherServer(model="fault", plan=plan) as server:
        job = make_job(tmp_path, server.url, prompts)
        assert main(["run", str(job), "--no-progress"]) == 3
        log = [r for r in server.log if r.path.endswith(("/completions", "/tokenize"))]
    sent = Counter(r.outcome for r in log)  # every request, preflight's own included
    for_rows = Counter(r.outcome for r in log if (r.key or "").startswith("op "))
    out = tmp_path / "out"
    status = read_status(out)
    job_id = status.job_id
    # What the workers sent (rows and the worker's probe), by outcome, as the run counted it.
    counted = Counter()
    for endpoint in status.endpoints.values():
        counted.update(endpoint.requests)
    assert for_rows["ok"] <= counted["200"] <= sent["ok"] and counted["503"] == sent["503"]
    table = reader.read_table(out)
    data, failed = shard_rows(out)
    units = len(reader.data_files(out, "data"))
    expected = {
        "ray_harvest_shards_committed_total{}": units,
        "ray_harvest_rows_committed_total{kind=data}": data,
        "ray_harvest_rows_committed_total{kind=failed}": failed,
        "ray_harvest_failures_total{error_class=BadRequest}": bad,
        "ray_harvest_tokens_generated_total{}": sum(table["completion_tokens"].to_pylist()),
        "ray_harvest_requests_total{outcome=200}": counted["200"],
        "ray_harvest_requests_total{outcome=503}": counted["503"],
        "ray_harvest_requests_total{outcome=400}": counted["400"],
        "ray_harvest_request_latency_seconds_count{}": sum(counted.values()),
    }
    deadline = time.monotonic() + 120  # Ray exports metrics every few seconds
    while True:
        seen = prometheus(ray_metrics_url, job_id)
        if all(seen.get(k) == v for k, v in expected.items()):
            break
        assert time.monotonic() < deadline, str({k: (seen.get(k), v) for k, v in expected.items()})
        time.sleep(1)
    assert sent["503"] > 0 and sent["400"] == bad  # the run did see what the metrics count


def test_json_run_log_names_every_fault_class_seen(tmp_path, ray_cluster):
    plan = FaultPlan(
        rate_429=0.05, retry_after_s=0.1, rate_500=0.05, rate_503=0.05, rate_reset=0.05,
        rate_stall=0.03, stall_s=3.0, rate_truncated=0.05, rate_malformed=0.05,
        always_400=bad_prompts(2), seed=5,
    )  # fmt: skip
    with FaultTeacherServer(model="fault", plan=plan) as server:
        job = make_job(tmp_path, server.url, 200)
        assert main(["run", str(job), "--no-progress", "--log-format", "json"]) == 3
        seen = {r.outcome for r in server.log if r.path.endswith(("/completions", "/tokenize"))}
    lines = (tmp_path / "out" / "_harvest" / "log.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    logged = {e["error_class"] for e in events if e["event"] in ("request_error", "request_failed")}
    expected = {OUTCOME_CLASS[o] for o in seen if o != "ok"}
    assert len(expected) >= 6, seen  # the plan did inject the faults
    assert expected <= logged, (expected, logged)
    assert [e["event"] for e in events][:1] == ["job_started"]
    assert events[-1]["event"] == "job_finished" and events[-1]["state"] == "done with failures"
    assert "spec" in events[0] and events[0]["spec"]["teacher"]["model"] == "fault"
