"""The job's status file, ``OUT/_harvest/status.json``, and how ``harvest status`` shows it.

The driver rewrites the whole file every few seconds (one atomic write, so a reader never sees
half of it) and once more when the run ends. Anyone who can read the output can ask how a job
stands, during and after the run; a driver that was killed leaves ``state: running`` with an
``updated_at`` older than a few heartbeats, which ``render`` shows as crashed (stale).
"""

from __future__ import annotations

import math
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from workers.storage import store_for

STATUS_FILE = "_harvest/status.json"
STALE_AFTER_HEARTBEATS = 3
HISTORY_POINTS = 400  # a long run keeps every other point when the list fills up

State = Literal["running", "done", "done with failures", "stopped", "crashed"]


class EndpointStatus(BaseModel):
    requests: dict[str, int] = Field(default_factory=dict)  # outcome -> count
    state: str = "up"  # "up", "circuit open" or "paused (429)"
    since: float | None = None
    reason: str = ""


class ReplicaStatus(BaseModel):
    """A managed replica: where it serves, and how long its latest restart kept it away."""

    url: str | None = None  # None while it restarts (or once out of restarts)
    restarts: int = 0
    died_at: float | None = None  # wall clock: the driver saw its server gone (latest death)
    healthy_after_s: float | None = None  # from the death to the new server's /health
    first_answer_after_s: float | None = None  # from the death to its first answered request


class JobStatus(BaseModel):
    """One snapshot of a run, as written to the status file."""

    job_id: str
    state: State = "running"
    reason: str = ""
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    started_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    heartbeat_s: float = 5.0
    prompts_total: int = 0  # the output as a whole: what it holds, this run's work included
    prompts_done: int = 0
    data_rows: int = 0
    failure_rows: int = 0
    tokens: int = 0
    run_prompts: int = 0  # this (or the last) run only: what the rates below are made of
    run_tokens: int = 0
    tokens_per_s_last_minute: float = 0.0
    tokens_per_s_overall: float = 0.0
    eta_s: float | None = None
    failures_by_class: dict[str, int] = Field(default_factory=dict)
    retries: int = 0
    in_flight: int = 0
    endpoints: dict[str, EndpointStatus] = Field(default_factory=dict)
    latency_s: dict[str, float | None] = Field(default_factory=dict)  # p50 / p90 / p99
    circuits_opened: dict[str, int] = Field(default_factory=dict)  # endpoint -> times opened
    # One point per heartbeat of the last run (thinned to HISTORY_POINTS), for `harvest report`:
    # {"t", "prompts", "tokens", "p50", "p90", "in_flight", "ok": {endpoint: 200s so far}}.
    history: list[dict[str, Any]] = Field(default_factory=list)
    worker_restarts: int = 0
    replica_restarts: int = 0
    replicas: list[ReplicaStatus] = Field(default_factory=list)  # managed replicas only

    def shown_state(self, now: float | None = None) -> str:
        """The state, or "crashed (stale)" for a running job whose driver stopped writing."""
        age = (time.time() if now is None else now) - self.updated_at
        if self.state == "running" and age > STALE_AFTER_HEARTBEATS * self.heartbeat_s:
            return "crashed (stale)"
        return self.state


def write_status(out_dir: str | Path, status: JobStatus) -> None:
    """Replace the status file in one whole-object write (a reader sees the old or the new
    one), on a local folder or an object store."""
    store_for(str(out_dir)).write_bytes(STATUS_FILE, status.model_dump_json(indent=1).encode())


def read_status(out_dir: str | Path) -> JobStatus:
    try:
        return JobStatus.model_validate_json(store_for(str(out_dir)).read_bytes(STATUS_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(f"{out_dir}: no {STATUS_FILE}; has a harvest run here?") from None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def render(status: JobStatus, now: float | None = None) -> str:
    """What ``harvest status OUT`` prints."""
    now = time.time() if now is None else now
    state = status.shown_state(now)
    s = status
    done_pct = 100.0 * s.prompts_done / s.prompts_total if s.prompts_total else 100.0
    lines = [
        f"job {s.job_id}: {state}" + (f" ({s.reason})" if s.reason else ""),
        f"  driver {s.host} pid {s.pid}, started {_when(s.started_at)}, "
        f"last update {_when(s.updated_at)} ({now - s.updated_at:.0f}s ago)",
        f"  output: prompts {s.prompts_done}/{s.prompts_total} ({done_pct:.1f}%), data rows "
        f"{s.data_rows}, failure rows {s.failure_rows}, tokens {s.tokens}, "
        f"ETA {_duration(s.eta_s)}",
        f"  last run: {s.run_prompts} prompts, tokens {s.run_tokens}: "
        f"{s.tokens_per_s_last_minute:,.0f} tok/s last minute, "
        f"{s.tokens_per_s_overall:,.0f} tok/s overall",
        f"  last run: in flight {s.in_flight}, retries {s.retries}, worker restarts "
        f"{s.worker_restarts}, replica restarts {s.replica_restarts}",
    ]
    if s.latency_s:
        lat = ", ".join(f"{k} <= {v:g}s" for k, v in s.latency_s.items() if v is not None)
        lines.append(f"  last run: latency {lat or '-'}")
    for cls, count in sorted(s.failures_by_class.items()):
        lines.append(f"  output: failed prompts, {cls}: {count}")
    for url, ep in sorted(s.endpoints.items()):
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(ep.requests.items())) or "-"
        health = ep.state if ep.state == "up" else f"{ep.state} since {_when(ep.since)}"
        if ep.reason:
            health += f" ({ep.reason})"
        opened = s.circuits_opened.get(url, 0)
        if opened:
            health += f", circuit opened {opened}x"
        lines.append(f"  {url}: {health}; last run HTTP requests (retries included) {outcomes}")
    for i, r in enumerate(s.replicas):
        line = f"  replica {i}: {r.url or 'restarting'}, restarts {r.restarts}"
        if r.died_at is not None:
            line += f"; server died {_when(r.died_at)}, healthy after {_seconds(r.healthy_after_s)}"
            line += f", first answer after {_seconds(r.first_answer_after_s)}"
        lines.append(line)
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"
