"""Driver side of managed replicas (a teacher's, or a round's student's): launch them, follow
their URLs, stop them.

Each replica is a ``TeacherReplica`` actor that Ray restarts (up to ``max_restarts``) when its
server dies; a restarted replica comes back on a new port. ``poll`` notices the death (Ray's
restart count) and the new URL, which the scheduler hands to the harvest workers' routers as
soon as the new server answers ``/health``; ``status`` says how long each restart took (the
monitor adds the first answered request).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from harvest.watch.logs import event
from harvest.watch.status import ReplicaStatus
from schemas.teacher import ReplicaSpec
from workers.replica.actor import TeacherReplica

POLL_EVERY_S = 1.0


class ReplicaError(RuntimeError):
    """A replica could not start or every replica is gone; the message names the log folder."""


class ReplicaSet:
    """The replicas of one model; ``role`` ("teacher" or "student") names them in messages
    and events, so a round's log says whose server died."""

    def __init__(
        self, spec: ReplicaSpec, served_name: str, log_dir: Path, role: str = "teacher"
    ) -> None:
        self.spec, self.role = spec, role
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        cache = Path(spec.cache_dir or Path.home() / ".cache" / "teacher-harvest" / "vllm")
        res = spec.resources
        self.actors = [
            TeacherReplica.options(
                num_gpus=res.num_gpus,
                num_cpus=res.num_cpus,
                resources=res.custom or None,
                max_restarts=spec.max_restarts,
                max_task_retries=-1,  # calls wait for a restarting replica instead of failing
            ).remote(
                i,
                spec.model,
                served_name,
                spec.vllm_args,
                spec.env,
                spec.host,
                str(log_dir),
                str(cache),
                spec.startup_timeout_s,
            )
            for i in range(spec.count)
        ]
        self.urls: list[str | None] = [None] * spec.count
        self.status = [ReplicaStatus() for _ in range(spec.count)]
        self.restarts = 0
        self._pending: dict[ray.ObjectRef, int] = {}
        self._last_poll = 0.0

    def wait_ready(self) -> list[str]:
        """Block until every replica's server answers /health; return their URLs."""
        refs = [a.url.remote() for a in self.actors]
        try:
            self.urls = list(ray.get(refs, timeout=self.spec.startup_timeout_s + 60))
        except (RayActorError, RayTaskError, GetTimeoutError) as err:
            self.stop()
            raise ReplicaError(
                f"{self.role} replicas did not start ({type(err).__name__}); server logs are in "
                f"{self.log_dir}"
            ) from None
        for st, url in zip(self.status, self.urls, strict=True):
            st.url = url
        return [u for u in self.urls if u]

    def poll(self) -> list[str] | None:
        """The new URL list when a replica came back elsewhere, else None (cheap, non-blocking)."""
        now = time.monotonic()
        if now - self._last_poll < POLL_EVERY_S:
            return None
        self._last_poll = now
        for i, actor in enumerate(self.actors):
            if i not in self._pending.values():
                self._pending[actor.url.remote()] = i
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
        self._follow_restarts()
        changed = False
        for ref in ready:
            i = self._pending.pop(ref)
            try:
                url = ray.get(ref)
            except (RayActorError, RayTaskError):
                url = None  # out of restarts
            if url != self.urls[i]:
                changed = True
                self.urls[i] = url
                self._moved(i, url)
        live = [u for u in self.urls if u]
        if not live:
            raise ReplicaError(
                f"every {self.role} replica is gone; server logs are in {self.log_dir}"
            )
        return live if changed else None

    def _follow_restarts(self) -> None:
        """A replica whose restart count grew has lost its server: note when, and say so."""
        for i, actor in enumerate(self.actors):
            count = _restarts_of(actor)
            st = self.status[i]
            if count > st.restarts:
                st.restarts, st.died_at, st.url = count, time.time(), None  # until it is back
                st.healthy_after_s = st.first_answer_after_s = None
                event("replica_down", f"{self.role} replica {i} ({self.urls[i]}) lost its server; "
                      "Ray restarts it", logging.WARNING, replica=i, url=self.urls[i],
                      role=self.role)  # fmt: skip
        self.restarts = sum(st.restarts for st in self.status)

    def _moved(self, i: int, url: str | None) -> None:
        st = self.status[i]
        st.url = url
        if url is None or st.died_at is None:
            return
        st.healthy_after_s = time.time() - st.died_at
        event("replica_back", f"{self.role} replica {i} is healthy again at {url}, "
              f"{st.healthy_after_s:.1f} s after its server died; it rejoins the router",
              logging.WARNING, replica=i, url=url, after_s=st.healthy_after_s,
              role=self.role)  # fmt: skip

    def stop(self) -> None:
        self.restarts = sum(_restarts_of(a) for a in self.actors)
        try:
            ray.get([a.stop.remote() for a in self.actors], timeout=15)
        except (RayActorError, RayTaskError, GetTimeoutError):
            pass
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _restarts_of(actor: ray.actor.ActorHandle) -> int:
    """How often Ray restarted this actor, from the GCS actor table (no dashboard needed).

    ``ray._private.state`` is not public API; ray is pinned (pyproject) and a test covers it.
    """
    try:
        info = ray._private.state.actors(actor_id=actor._actor_id.hex())
    except Exception:  # the table is unavailable: report what we know, never crash the job
        return 0
    return int(info.get("NumRestarts", 0)) if isinstance(info, dict) else 0
