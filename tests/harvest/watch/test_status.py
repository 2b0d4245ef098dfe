"""Status file, its rendering, run logs, request statistics and status lines, without a cluster."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter

import pytest

from harvest.watch import logs
from harvest.watch.monitor import Monitor
from harvest.watch.progress import Progress
from harvest.watch.status import (
    EndpointStatus,
    JobStatus,
    ReplicaStatus,
    read_status,
    render,
    write_status,
)
from workers.teacher.router import EndpointDown
from workers.teacher.stats import FAILURE_SAMPLES, LATENCY_BOUNDS_S, RequestSnapshot, RequestStats


def status(**kw) -> JobStatus:
    base = {"job_id": "j1", "prompts_total": 10, "prompts_done": 4, "heartbeat_s": 5.0}
    return JobStatus(**{**base, **kw})


def test_status_file_round_trips_and_leaves_no_temporary(tmp_path):
    s = status(failures_by_class={"BadRequest": 2}, endpoints={"http://e/v1": EndpointStatus()})
    write_status(tmp_path, s)
    assert read_status(tmp_path) == s
    assert [p.name for p in (tmp_path / "_harvest").iterdir()] == ["status.json"]


def test_a_running_job_whose_driver_stopped_writing_shows_as_stale():
    s = status(updated_at=1000.0)
    assert s.shown_state(now=1000.0 + 3 * 5.0) == "running"  # three heartbeats: still fresh
    assert s.shown_state(now=1000.0 + 3 * 5.0 + 1) == "crashed (stale)"
    assert status(state="done", updated_at=0.0).shown_state(now=1e9) == "done"


def test_render_names_state_counts_failures_and_endpoints():
    s = status(
        state="stopped",
        reason="interrupted",
        failures_by_class={"ServerError": 3},
        endpoints={
            "http://a/v1": EndpointStatus(requests={"200": 7, "503": 3}),
            "http://b/v1": EndpointStatus(state="circuit open", since=0.0, reason="ConnectError"),
        },
        latency_s={"p50": 0.5, "p90": 1.0, "p99": None},
    )
    text = render(s, now=s.updated_at)
    assert text.splitlines()[0] == "job j1: stopped (interrupted)"
    assert "prompts 4/10 (40.0%)" in text and "output: failed prompts, ServerError: 3" in text
    assert "http://a/v1: up; last run HTTP requests (retries included) 200: 7, 503: 3" in text
    assert "http://b/v1: circuit open since 1970-01-01 00:00:00 UTC (ConnectError)" in text
    assert "latency p50 <= 0.5s, p90 <= 1s" in text


def test_missing_status_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no _harvest/status\.json"):
        read_status(tmp_path)


def test_request_snapshots_add_up_and_give_bucket_percentiles():
    a, b = RequestStats(), RequestStats()
    for latency in (0.01, 0.02, 0.3):
        a.observe("e1", "200", latency)
    b.observe("e2", "503", 7.0)
    for i in range(FAILURE_SAMPLES + 2):
        a.failed("BadRequest", f"m{i}")
        b.error("RateLimited", "slow down")
    total = RequestSnapshot()
    total.merge(a.snapshot)
    total.merge(b.snapshot)
    assert total.requests == {("e1", "200"): 3, ("e2", "503"): 1}
    assert (
        sum(total.latency_buckets) == 4 and len(total.latency_buckets) == len(LATENCY_BOUNDS_S) + 1
    )
    assert total.latency_percentile(0.5) == 0.05 and total.latency_percentile(1.0) == 10.0
    assert total.failures == {"BadRequest": ["m0", "m1", "m2"]}
    assert total.errors == {"RateLimited": ["slow down"] * FAILURE_SAMPLES}
    assert RequestSnapshot().latency_percentile(0.5) is None


def test_json_logs_carry_event_and_fields_and_the_run_log_keeps_earlier_runs(tmp_path, capsys):
    logs.configure("info", "json")
    first = logs.attach_run_log(tmp_path)
    logs.event("endpoint_down", "endpoint e down", logging.WARNING, endpoint="e")
    logs.detach_run_log(first)
    second = logs.attach_run_log(tmp_path)
    logs.event("job_finished", "done", state="done")
    logs.detach_run_log(second)
    stderr = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["event"], r["level"]) for r in stderr] == [
        ("endpoint_down", "warning"),
        ("job_finished", "info"),
    ]
    assert stderr[0]["endpoint"] == "e" and stderr[1]["state"] == "done"
    lines = [json.loads(x) for x in (tmp_path / "_harvest" / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines] == ["endpoint_down", "job_finished"]
    logs.configure("info", "text")


def test_warning_level_keeps_info_out_of_stderr_but_in_the_run_log(tmp_path, capsys):
    logs.configure("warning", "text")
    handler = logs.attach_run_log(tmp_path)
    logs.event("job_started", "starting")
    logs.detach_run_log(handler)
    assert capsys.readouterr().err == ""
    assert "job_started" in (tmp_path / "_harvest" / "log.jsonl").read_text()
    logs.configure("info", "text")


def test_status_lines_off_a_terminal_and_outage_notes():
    stream = io.StringIO()
    progress = Progress(10, 2, every_s=0.0, stream=stream, outage_timeout_s=30)
    down = [EndpointDown("http://e/v1", "circuit open", 0.0, "TeacherUnavailable")]
    progress.update(done=5, tokens=100, failures=1, retries=2, in_flight=3, down=down)
    progress.update(done=7, tokens=200, failures=1, retries=2, in_flight=3)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("teacher unavailable, rows wait (not failed): http://e/v1 circuit")
    assert "(teacher.outage_timeout_s)" in lines[0]
    assert lines[1].startswith("harvest: 5/10 prompts (50.0%)")
    assert "3 in flight, 2 retries, 1 failed, 1 endpoint(s) down since 00:00:00 UTC" in lines[1]
    assert lines[2].startswith("teacher answers again after")
    assert lines[3].startswith("harvest: 7/10 prompts (70.0%)") and "down" not in lines[3]


def test_a_restarted_replica_shows_how_long_it_was_away(tmp_path):
    died = 1_000_000.0
    replicas = [
        ReplicaStatus(url="http://127.0.0.1:9001/v1"),
        ReplicaStatus(url="http://127.0.0.1:9100/v1", restarts=1, died_at=died,
                      healthy_after_s=40.0),
    ]  # fmt: skip
    monitor = Monitor(tmp_path, status(), Progress(10, 0, enabled=False), endpoints=[])
    monitor.replicas = replicas

    def tick(requests: dict) -> None:
        monitor.tick(committed_prompts=0, counters={}, down=[], outage=False, in_flight=0,
                     requests=RequestSnapshot(requests=Counter(requests)), worker_restarts=0,
                     replica_restarts=1)  # fmt: skip

    tick({("http://127.0.0.1:9001/v1", "200"): 5})  # only the survivor answered so far
    assert replicas[1].first_answer_after_s is None
    tick({("http://127.0.0.1:9001/v1", "200"): 9, ("http://127.0.0.1:9100/v1", "200"): 1})
    away = replicas[1].first_answer_after_s
    assert away is not None and away >= 40.0  # after its /health, from the same death
    tick({("http://127.0.0.1:9100/v1", "200"): 7})
    assert replicas[1].first_answer_after_s == away  # the first answer, not the latest
    monitor.finish("done")
    shown = read_status(tmp_path)
    assert [r.url for r in shown.replicas] == [r.url for r in replicas]
    lines = render(shown).splitlines()
    assert "  replica 0: http://127.0.0.1:9001/v1, restarts 0" in lines
    assert any(line.startswith("  replica 1: http://127.0.0.1:9100/v1, restarts 1; server died")
               and "healthy after 40.0s, first answer after" in line for line in lines)  # fmt: skip
