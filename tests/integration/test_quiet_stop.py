"""After a job stops with its one clean line, nothing but harvest's own lines reach the user:
no Ray "Unhandled error" tracebacks of other workers, no "(raylet) ..." paragraphs, unless
``--log-level debug`` (issue 22, point 9)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fault_jobs import fault_job
from fault_teacher_server import FaultPlan, FaultTeacherServer
from test_outage import fault_rows, outage_line
from test_resume import wait_for_units

pytestmark = pytest.mark.integration


OURS = ("harvest:", "teacher unavailable, rows wait", "teacher answers again")


def test_an_outage_stop_prints_only_harvests_lines(tmp_path):
    with FaultTeacherServer(model="fault", plan=FaultPlan(latency_s=0.05)) as server:
        job = fault_job(tmp_path / "job", server.url, fault_rows(300), outage_timeout_s=3)
        out = job.parent / "out"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private cluster
        proc = subprocess.Popen(
            [sys.executable, "-m", "harvest.cli", "run", str(job), "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        wait_for_units(proc, out, 1)
        server.go_down()
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    outage_line(stderr)
    foreign = [line for line in stderr.splitlines() if line and not line.startswith(OURS)]
    assert not foreign, stderr
    assert "Unhandled error" not in stderr + stdout and "(raylet)" not in stderr + stdout
    assert stdout.strip() == "", stdout
