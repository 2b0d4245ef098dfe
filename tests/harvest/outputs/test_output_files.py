"""The status file and the run log live beside the shards: on object storage too."""

from __future__ import annotations

import json

from harvest.watch import logs
from harvest.watch.status import STATUS_FILE, JobStatus, read_status, write_status
from workers.storage import open_store


def test_status_file_on_s3(s3_prefix):
    status = JobStatus(job_id="j1", prompts_total=10, prompts_done=4)
    write_status(s3_prefix, status)
    assert read_status(s3_prefix) == status
    assert open_store(s3_prefix).list() == [STATUS_FILE]  # no temporary, nothing on local disk


def test_run_log_on_s3_keeps_earlier_runs(s3_prefix):
    logs.configure("info", "text")
    for event in ("job_started", "job_finished"):
        handler = logs.attach_run_log(s3_prefix)
        logs.event(event, event)
        logs.detach_run_log(handler)
    lines = open_store(s3_prefix).read_bytes(logs.RUN_LOG).decode().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["job_started", "job_finished"]
