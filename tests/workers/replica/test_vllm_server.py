"""The server guard: a launched server's process group dies with the process that launched it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from workers.replica.vllm_server import start_guard


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead, just not yet reaped
        return fh.read().split(")")[-1].split()[0] != "Z"


def guard_pids(pgid: int, timeout: float = 10) -> list[int]:
    """The guard watching ``pgid`` (it starts detached, so give it a moment to appear)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for p in psutil.process_iter(["cmdline", "ppid"]):
            cmd = p.info["cmdline"] or []
            if "workers.replica.vllm_server" in cmd and cmd[-1:] == [str(pgid)]:
                assert p.info["ppid"] != os.getpid()  # detached: not our child
                found.append(p.pid)
        if found:
            return found
        time.sleep(0.05)
    return []


def wait_gone(pids: list[int], timeout: float = 15) -> bool:
    assert pids, "no process to wait for: that would prove nothing"
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_guard_kills_the_server_group_when_the_launcher_dies():
    # Stands in for vLLM: a group leader with an engine child in its process group.
    server = subprocess.Popen(
        ["bash", "-c", "sleep 120 & echo $!; wait"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child_pid = int(server.stdout.readline())
    launcher = subprocess.Popen(["sleep", "120"])  # stands in for the replica actor
    start_guard(launcher.pid, server.pid)
    try:
        assert server.poll() is None and alive(child_pid)
        guards = guard_pids(server.pid)
        assert guards  # running, and not a child of ours
        launcher.kill()
        launcher.wait()
        assert server.wait(timeout=15) != 0  # terminated by a signal
        deadline = time.monotonic() + 15
        while alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child_pid)
        # The guard found before the kill must exit (searching again after the fact would find
        # nothing, and waiting for nothing always succeeds).
        assert wait_gone(guards)
    finally:
        for p in (server, launcher):
            if p.poll() is None:
                p.kill()
        if alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_guard_exits_when_the_server_ends_by_itself():
    server = subprocess.Popen(["sleep", "0.2"], start_new_session=True)
    launcher = subprocess.Popen(["sleep", "120"])
    start_guard(launcher.pid, server.pid)
    try:
        guards = guard_pids(server.pid)
        assert guards
        server.wait(timeout=5)
        assert wait_gone(guards)
        assert launcher.poll() is None  # the guard never touches its launcher
    finally:
        launcher.kill()
