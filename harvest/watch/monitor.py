"""Watch a running harvest from the driver: progress, the status file, logs and metrics.

The dispatch loop calls ``tick`` about once a second with the workers' live statistics and
``committed`` for every unit the driver commits; the monitor turns them into the progress bar
(or periodic lines), ``OUT/_harvest/status.json`` every heartbeat, log lines for what changed
(endpoint health, circuit openings, Retry-After pauses, replica restarts, first failures of
each class) and the driver's Prometheus metrics.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harvest.errors import JobAborted
from harvest.watch.logs import attach_run_log, detach_run_log, event
from harvest.watch.metrics import DriverMetrics
from harvest.watch.progress import Progress
from harvest.watch.status import (
    HISTORY_POINTS,
    EndpointStatus,
    JobStatus,
    ReplicaStatus,
    State,
    write_status,
)
from schemas.job import JobSpec
from workers.teacher.router import EndpointDown
from workers.teacher.stats import RequestSnapshot

HEARTBEAT_S = 5.0
RATE_WINDOW_S = 60.0


class Monitor:
    def __init__(
        self,
        out_dir: str | Path,
        status: JobStatus,
        progress: Progress,
        *,
        endpoints: list[str],
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.out_dir = out_dir
        self.status = status
        self.status.heartbeat_s = heartbeat_s
        self.progress = progress
        self.endpoints = endpoints
        self.metrics = DriverMetrics(status.job_id)
        self.started = time.monotonic()
        self.tokens_before = status.tokens  # committed by earlier runs
        self.done_before = status.prompts_done
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._written = 0.0
        self._down: dict[str, EndpointDown] = {}
        self._logged: set[tuple[str, str, str]] = set()  # first errors already logged
        self._replica_restarts = 0
        self.replicas: list[ReplicaStatus] = []  # managed replicas (``harvest.replicas``)
        self.ended: tuple[State, str] | None = None
        write_status(out_dir, status)

    def committed(
        self, data_rows: int, failure_rows: int, error_classes: dict[str, int], prompts: int
    ) -> None:
        s = self.status
        s.data_rows += data_rows
        s.failure_rows += failure_rows
        for cls, count in error_classes.items():
            s.failures_by_class[cls] = s.failures_by_class.get(cls, 0) + count
        self.metrics.committed(data_rows, failure_rows, error_classes)

    def tick(
        self,
        *,
        committed_prompts: int,
        counters: dict[str, int],
        down: list[EndpointDown],
        outage: bool,
        in_flight: int,
        requests: RequestSnapshot,
        worker_restarts: int,
        replica_restarts: int,
    ) -> None:
        now = time.monotonic()
        s = self.status
        tokens = counters.get("completion_tokens", 0)
        answered = counters.get("prompts", 0)
        s.prompts_done = min(s.prompts_total, self.done_before + max(committed_prompts, answered))
        s.tokens = self.tokens_before + tokens
        s.run_tokens, s.run_prompts = tokens, s.prompts_done - self.done_before
        s.retries = counters.get("retries", 0)
        s.in_flight = in_flight
        s.worker_restarts, s.replica_restarts = worker_restarts, replica_restarts
        self._samples.append((now, tokens))
        while self._samples[0][0] < now - RATE_WINDOW_S:
            self._samples.popleft()
        t0, k0 = self._samples[0]
        s.tokens_per_s_last_minute = (tokens - k0) / (now - t0) if now > t0 else 0.0
        s.tokens_per_s_overall = tokens / max(1e-6, now - self.started)
        rate = (s.prompts_done - self.done_before) / max(1e-6, now - self.started)
        s.eta_s = (s.prompts_total - s.prompts_done) / rate if rate > 0 else None
        s.latency_s = {f"p{q}": requests.latency_percentile(q / 100) for q in (50, 90, 99)}
        self.metrics.workers(counters, requests)
        self._follow_endpoints(down, requests)
        self._follow_events(counters, requests, replica_restarts)
        self._follow_replicas(requests)
        self.progress.update(
            done=s.prompts_done,
            tokens=tokens,
            failures=counters.get("failed_prompts", 0),
            retries=s.retries,
            in_flight=in_flight,
            down=down if outage else [],
        )
        if now - self._written >= self.status.heartbeat_s:
            self._write()

    def _follow_endpoints(self, down: list[EndpointDown], requests: RequestSnapshot) -> None:
        s = self.status
        by_endpoint: dict[str, EndpointStatus] = {e: EndpointStatus() for e in self.endpoints}
        for (endpoint, outcome), count in requests.requests.items():
            by_endpoint.setdefault(endpoint, EndpointStatus()).requests[outcome] = count
        now_down = {d.endpoint: d for d in down}
        for endpoint, d in now_down.items():
            ep = by_endpoint.setdefault(endpoint, EndpointStatus())
            ep.state, ep.since, ep.reason = d.state, d.since, d.reason
            if d.state == "circuit open" and (
                endpoint not in self._down or self._down[endpoint].state != d.state
            ):  # once per endpoint, however many workers' routers saw it open
                s.circuits_opened[endpoint] = s.circuits_opened.get(endpoint, 0) + 1
                event("circuit_opened", f"endpoint {endpoint}: circuit opened after repeated "
                      "failures", logging.WARNING, endpoint=endpoint,
                      total=s.circuits_opened[endpoint])  # fmt: skip
            if endpoint not in self._down or self._down[endpoint].state != d.state:
                name = "retry_after_pause" if d.state.startswith("paused") else "endpoint_down"
                event(name, f"endpoint {d.describe()}", logging.WARNING, endpoint=endpoint,
                      state=d.state, since=d.since, reason=d.reason)  # fmt: skip
        for endpoint in self._down.keys() - now_down.keys():
            event("endpoint_up", f"endpoint {endpoint} takes requests again", endpoint=endpoint)
        self._down = now_down
        s.endpoints = by_endpoint
        self.metrics.health(list(by_endpoint), set(now_down), s.replica_restarts)

    def _follow_events(
        self, counters: dict[str, int], requests: RequestSnapshot, replica_restarts: int
    ) -> None:
        if replica_restarts > self._replica_restarts:
            event("replica_restart", f"a teacher replica restarted ({replica_restarts} so far)",
                  logging.WARNING, total=replica_restarts)  # fmt: skip
            self._replica_restarts = replica_restarts
        for name, by_class, what in (
            ("request_error", requests.errors, "a request attempt failed (retried if it can be)"),
            ("request_failed", requests.failures, "a prompt failed for good"),
        ):
            for cls, messages in by_class.items():
                for message in messages:
                    if (name, cls, message) not in self._logged:
                        self._logged.add((name, cls, message))
                        event(name, f"{what}: {cls}: {message}", logging.WARNING, error_class=cls)

    def _follow_replicas(self, requests: RequestSnapshot) -> None:
        """A restarted replica's first answered request: how long it was away, all told."""
        for i, r in enumerate(self.replicas):
            if r.url is None or r.died_at is None or r.first_answer_after_s is not None:
                continue
            if requests.requests.get((r.url, "200"), 0) > 0:
                r.first_answer_after_s = time.time() - r.died_at
                event("replica_answers", f"teacher replica {i} at {r.url} answered its first "
                      f"request {r.first_answer_after_s:.1f} s after its server died",
                      logging.WARNING, replica=i, url=r.url,
                      after_s=r.first_answer_after_s)  # fmt: skip
        self.status.replicas = list(self.replicas)

    def _remember(self) -> None:
        """Add one point to the status file's bounded history of the run."""
        s = self.status
        s.history.append({
            "t": round(time.time(), 3), "prompts": s.prompts_done, "tokens": s.run_tokens,
            "p50": s.latency_s.get("p50"), "p90": s.latency_s.get("p90"),
            "in_flight": s.in_flight,
            "ok": {e: ep.requests.get("200", 0) for e, ep in s.endpoints.items()},
        })  # fmt: skip
        if len(s.history) > HISTORY_POINTS:
            s.history = s.history[::2]

    def _write(self) -> None:
        self._remember()
        self.status.updated_at = time.time()
        write_status(self.out_dir, self.status)
        self._written = time.monotonic()

    def note(self, message: str) -> None:
        self.progress.note(message)

    def end(self, state: State, reason: str = "") -> None:
        """How the run ended, when not by finishing its work (e.g. stopped by a signal)."""
        self.ended = (state, reason)

    def finish(self, state: State, reason: str = "") -> None:
        """The run ended: write the final state (a killed driver never gets here: stale)."""
        self.status.state, self.status.reason = state, reason
        self.status.in_flight = 0
        self.progress.close()
        self._write()


@contextmanager
def watched_run(
    out_dir: str | Path,
    status: JobStatus,
    progress: Progress,
    endpoints: list[str],
    spec: JobSpec,
    heartbeat_s: float = HEARTBEAT_S,
) -> Iterator[Monitor]:
    """Watch one run: its log, its status file from start to final state, whatever ends it."""
    run_log = attach_run_log(out_dir)
    event("job_started", f"job {status.job_id}: {status.prompts_total} prompts, "
          f"{status.prompts_done} done before", job_id=status.job_id,
          spec=spec.model_dump(mode="json"))  # fmt: skip
    monitor = Monitor(out_dir, status, progress, endpoints=endpoints, heartbeat_s=heartbeat_s)
    state: State = "crashed"
    reason = ""
    try:
        yield monitor
        if monitor.ended is not None:
            state, reason = monitor.ended
        else:
            state = "done with failures" if status.failure_rows else "done"
    except (KeyboardInterrupt, JobAborted) as err:
        state, reason = "stopped", str(err) or "interrupted"
        raise
    except BaseException as err:
        reason = f"{type(err).__name__}: {err}"
        raise
    finally:
        monitor.finish(state, reason)
        event("job_finished", f"job {status.job_id}: {state}" + (f" ({reason})" if reason else ""),
              job_id=status.job_id, state=state, data_rows=status.data_rows,
              failure_rows=status.failure_rows, tokens=status.tokens)  # fmt: skip
        detach_run_log(run_log)
