"""The status file tells the output as a whole from the last run, and counts circuits per
endpoint (issue 22, points 2-3)."""

from __future__ import annotations

import io
import json

from harvest.watch.monitor import Monitor
from harvest.watch.progress import Progress
from harvest.watch.status import EndpointStatus, JobStatus, render
from workers.teacher.router import EndpointDown
from workers.teacher.stats import RequestSnapshot


def test_render_labels_the_output_and_the_last_run():
    s = JobStatus(
        job_id="j1", state="done", prompts_total=10, prompts_done=10, data_rows=10, tokens=502,
        run_prompts=4, run_tokens=128, tokens_per_s_overall=12.0,
        endpoints={"http://a/v1": EndpointStatus(requests={"200": 7})},
    )  # fmt: skip
    text = render(s, now=s.updated_at)
    out_line = next(line for line in text.splitlines() if line.startswith("  output:"))
    run_line = next(line for line in text.splitlines() if line.startswith("  last run"))
    assert "tokens 502" in out_line and "tok/s" not in out_line
    assert "4 prompts" in run_line and "tokens 128" in run_line and "12 tok/s" in run_line
    assert "HTTP requests" in text  # not the same figure as the summary's prompts answered


def test_two_workers_seeing_one_endpoint_open_count_one_circuit(tmp_path, caplog):
    progress = Progress(4, 0, enabled=False, stream=io.StringIO())
    status = JobStatus(job_id="j1", prompts_total=4)
    monitor = Monitor(tmp_path, status, progress, endpoints=["http://a/v1", "http://b/v1"])
    down = [EndpointDown("http://a/v1", "circuit open", 0.0, "ConnectError")]
    for _ in range(2):
        monitor.tick(
            committed_prompts=0, counters={"circuit_opened": 2}, down=down, outage=False,
            in_flight=0, requests=RequestSnapshot(), worker_restarts=0, replica_restarts=0,
        )  # fmt: skip
    opened = [r for r in caplog.records if getattr(r, "event", "") == "circuit_opened"]
    assert len(opened) == 1 and "http://a/v1" in opened[0].getMessage()
    assert "2 endpoint" not in opened[0].getMessage()
    monitor.finish("done")
    assert json.loads((tmp_path / "_harvest" / "status.json").read_text())["circuits_opened"] == {
        "http://a/v1": 1
    }
