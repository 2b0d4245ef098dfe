"""The stop's last resort: once armed, the process ends whatever blocks it; disarmed, never."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

BLOCKED = """
import threading
from harvest.driver import stopping
stopping.SHUTDOWN_GRACE_S = 0.2
stopping.arm(0.1)
stopping.arm(600)  # a second stop request changes nothing
threading.Event().wait()  # blocked for good, as on a Ray call to a cluster that is gone
"""

DISARMED = """
import time
from harvest.driver import stopping
stopping.SHUTDOWN_GRACE_S = 0.2
stopping.arm(0.1)
stopping.disarm()  # the run ended in-process; the caller goes on
time.sleep(1.0)
print("alive")
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_an_armed_stop_ends_a_blocked_process_with_one_line():
    done = run(BLOCKED)
    assert done.returncode == 130, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harvest: error: still not stopped 0.3 s")
    assert "rerun the same command to resume" in lines[0]


def test_a_disarmed_stop_leaves_the_process_alone():
    done = run(DISARMED)
    assert done.returncode == 0 and done.stdout.strip() == "alive", done.stderr
