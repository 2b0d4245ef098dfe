"""A managed teacher replica: one vLLM OpenAI server run by a Ray actor, on that actor's node.

The actor holds the GPUs (``num_gpus`` = tensor-parallel size) that the server uses. If the
server process dies, the actor exits so Ray restarts it (and with it a fresh server on a new
port); if the actor dies, a guard process stops the server's whole process group. The driver
follows each replica's URL and tells the harvest workers when it changes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import ray

from workers.replica.vllm_server import VllmServer


@ray.remote
class TeacherReplica:
    def __init__(
        self,
        index: int,
        model: str,
        served_name: str,
        vllm_args: list[str],
        env: dict[str, str],
        host: str | None,
        log_dir: str,
        cache_dir: str,
        startup_timeout_s: float,
    ) -> None:
        self.index = index
        self.stopping = False
        self.server = VllmServer(
            model=model,
            served_name=served_name,
            workdir=Path(log_dir) / f"replica-{index}-{os.getpid()}",
            host=host or ray.util.get_node_ip_address(),
            extra_args=vllm_args,
            env=env,
            cache_dir=Path(cache_dir),
            die_with_parent=True,
        )
        self.server.start(timeout_s=startup_timeout_s)
        threading.Thread(target=self._watch, name="replica-watch", daemon=True).start()

    def _watch(self) -> None:
        """If the server dies on its own, exit the actor so Ray restarts the replica."""
        proc = self.server.proc
        if proc is None:
            return
        code = proc.wait()
        if not self.stopping:
            print(f"vLLM server exited with {code}; see {self.server.log_path}", flush=True)
            self.server.stop(grace_s=5)  # its engine processes, if they outlived it
            os._exit(1)

    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.stopping = True
        self.server.stop()
