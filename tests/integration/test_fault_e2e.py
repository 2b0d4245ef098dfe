"""Faults that do not go away, and wrong-shape 200s, end to end on the real Ray cluster.

The teacher is tests/fault_teacher_server.py; the harvest is `harvest run` as a user runs it.
Every prompt must still end in exactly one place, and the job must not be aborted by any of it.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from fault_plan import check_attempts
from fault_teacher_server import FaultPlan, FaultTeacherServer
from test_fault_matrix import N, write

from harvest.cli import main
from harvest.training import reader

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 6  # what test_fault_matrix.write puts in the job
TIMEOUT_S = 30.0  # nothing here stalls: no attempt may time out on a loaded machine


def completions_by_key(log) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in sorted((r for r in log if r.path == "/v1/completions"), key=lambda r: r.t):
        out.setdefault(r.key, []).append(r)
    return out


def test_retries_that_run_out_end_as_failure_rows(tmp_path, ray_cluster, capsys):
    prompts = [f"unreachable {i}" for i in range(40)]
    down = set(prompts[5::10])  # 4 prompts the teacher answers 503 forever
    plan = FaultPlan(always_503=down, rate_503=0.1, seed=3)
    with FaultTeacherServer(model="fault", plan=plan) as server:
        job = write(tmp_path, server.url, prompts, timeout_s=TIMEOUT_S)
        code = main(["run", str(job), "--no-progress"])
        by_key = completions_by_key(server.log)
    assert code == 3 and "completed with failures" in capsys.readouterr().out
    out = tmp_path / "out"
    data, failed = reader.read_table(out), reader.read_table(out, "failed").to_pylist()
    down_ids = {f"p{i}" for i, text in enumerate(prompts) if text in down}
    assert Counter((r["prompt_id"], r["sample_index"]) for r in failed) == {
        (pid, s): 1 for pid in down_ids for s in range(N)
    }  # exactly one failure row per sample
    for row in failed:
        assert (row["error_class"], row["http_status"]) == ("ServerError", 503)
        assert row["attempts"] == MAX_ATTEMPTS and "always_503" in row["message"]
    for text in down:  # the server saw every attempt (and maybe a few the row was not charged
        # for: 503s while the endpoint was out of rotation are the teacher's fault)
        outcomes = [r.outcome for r in by_key[text]]
        assert set(outcomes) == {"503"} and len(outcomes) >= MAX_ATTEMPTS
    assert data.num_rows == (len(prompts) - len(down)) * N
    assert not down_ids & set(data["prompt_id"].to_pylist())
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["this_run"]["failed_prompts_by_class"] == {"ServerError": len(down)}


def test_wrong_shape_200s_are_retried_and_never_abort_the_job(tmp_path, ray_cluster, capsys):
    prompts = [f"shape {i}" for i in range(80)]
    broken = set(prompts[::20])  # 4 prompts the teacher always answers with a null logprob
    plan = FaultPlan(rate_malformed=0.3, always_malformed=broken, seed=5)
    with FaultTeacherServer(model="fault", plan=plan) as server:
        job = write(tmp_path, server.url, prompts, timeout_s=TIMEOUT_S)
        code = main(["run", str(job), "--no-progress"])
        by_key = completions_by_key(server.log)
    assert code == 3 and "completed with failures" in capsys.readouterr().out
    out = tmp_path / "out"
    data, failed = reader.read_table(out).to_pylist(), reader.read_table(out, "failed").to_pylist()
    assert len(data) + len(failed) == len(prompts) * N
    broken_ids = {f"p{i}" for i, text in enumerate(prompts) if text in broken}
    assert {r["prompt_id"] for r in failed} == broken_ids and len(failed) == len(broken) * N
    for row in failed:
        assert (row["error_class"], row["http_status"]) == ("InvalidResponse", None)
        assert row["attempts"] == MAX_ATTEMPTS
    for text in broken:
        assert [r.outcome for r in by_key[text]] == ["malformed"] * MAX_ATTEMPTS
    retried = 0
    attempts = {r["prompt_id"]: r["attempts"] for r in data}
    for i, text in enumerate(prompts):
        if text in broken:
            continue
        outcomes = [r.outcome for r in by_key[text]]
        assert set(outcomes) <= {"malformed", "ok"}
        check_attempts(outcomes, attempts[f"p{i}"], exact=True)  # a wrong shape is always charged
        retried += len(outcomes) > 1
    assert retried >= 10  # the random wrong-shape answers were recovered by retrying
    for row in data:  # and what was kept is whole: no null slipped into a record
        assert None not in row["logprobs"] and len(row["logprobs"]) == len(row["token_ids"])


def test_a_kind_the_teacher_cannot_serve_stops_the_job_in_preflight(tmp_path, ray_cluster, capsys):
    """A base model without a chat template: chat rows would all fail; the job stops at once."""
    prompts = [f"kind {i}" for i in range(40)]  # every 4th row is chat (see write)
    with FaultTeacherServer(model="fault", plan=FaultPlan(no_chat_template=True)) as server:
        job = write(tmp_path, server.url, prompts)
        assert main(["run", str(job), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        sent = [r for r in server.log if r.path == "/v1/completions"]
        # The same teacher serves a completions-only input: the probe asks only what is needed.
        (tmp_path / "only").mkdir()
        only = write(tmp_path / "only", server.url, [])
        with open(tmp_path / "only" / "prompts.jsonl", "w") as fh:  # no chat row at all
            for i in range(10):
                fh.write(json.dumps({"id": f"t{i}", "prompt": f"text {i}"}) + "\n")
        assert main(["run", str(only), "--no-progress"]) == 0
    assert "\n" not in err  # one line, naming the kind, the K and the server's reason
    assert err.startswith("harvest: error: teacher cannot serve chat rows at logprobs=3: ")
    assert "BadRequest: HTTP 400: As of transformers v4.44" in err
    assert {r.key for r in sent} == {"Hello"}  # only the probes: no row was sent
    assert not list((tmp_path / "out").rglob("*.parquet"))  # and no failure row written
    assert reader.read_table(tmp_path / "only" / "out").num_rows == 10 * N


def test_an_endless_body_ends_as_failure_rows_with_bounded_worker_memory(
    tmp_path, ray_cluster, capsys
):
    """A teacher that streams a body forever: each attempt is cut off at the bound the request
    allows (never read to the timeout), the rows end as ``InvalidResponse`` failures, and the
    Ray worker reading it (found by its socket, measured by the server) does not grow."""
    prompts = [f"flood {i}" for i in range(30)]
    endless = set(prompts[3::10])  # 3 prompts whose answers never end
    plan = FaultPlan(always_endless=endless, seed=7)
    with FaultTeacherServer(model="fault", plan=plan) as server:
        job = write(tmp_path, server.url, prompts, timeout_s=TIMEOUT_S)
        code = main(["run", str(job), "--no-progress"])
        by_key = completions_by_key(server.log)
    assert code == 3 and "completed with failures" in capsys.readouterr().out
    out = tmp_path / "out"
    data, failed = reader.read_table(out).to_pylist(), reader.read_table(out, "failed").to_pylist()
    endless_ids = {f"p{i}" for i, text in enumerate(prompts) if text in endless}
    assert {r["prompt_id"] for r in failed} == endless_ids and len(failed) == len(endless) * N
    for row in failed:
        assert (row["error_class"], row["http_status"]) == ("InvalidResponse", None)
        assert row["attempts"] == MAX_ATTEMPTS and "past the" in row["message"]
    assert len(data) == (len(prompts) - len(endless)) * N
    slack = 32 << 20  # socket buffers of a loopback connection, aiohttp's read buffer
    for text in endless:
        recs = by_key[text]
        assert [r.outcome for r in recs] == ["endless"] * MAX_ATTEMPTS
        for rec in recs:
            assert 0 < rec.sent <= (1 << 20) + 64 * 1024 + slack, rec.sent  # the bound: ~1 MiB
            assert rec.rss is not None and rec.rss[1] - rec.rss[0] < 2 * slack, rec.rss


def test_small_units_do_not_starve_the_teacher(tmp_path, ray_cluster):
    """rows_per_shard 4 with 32 requests allowed in flight: the worker runs enough units at
    once to fill the cap (two units at a time held it at 2 x 4 = 8), counted by the server."""
    import yaml
    from fault_jobs import fault_job

    plan = FaultPlan(latency_s=0.3)
    with FaultTeacherServer(model="fault", plan=plan) as server:
        job = fault_job(tmp_path, server.url, [{"prompt": f"row {i}"} for i in range(160)])
        spec = yaml.safe_load(job.read_text())
        spec["output"]["rows_per_shard"] = 4 * spec["sampling"]["n"]
        spec["concurrency"] = {"workers": 1, "in_flight_per_endpoint": 32, "worker_cpus": 0.25}
        job.write_text(yaml.safe_dump(spec))
        assert main(["run", str(job), "--no-progress"]) == 0
        peak = max(r.busy for r in server.log if r.path == "/v1/completions")
    assert reader.read_table(tmp_path / "out").num_rows == 160 * spec["sampling"]["n"]
    assert 8 < peak <= 32
