"""Prometheus metrics through Ray's metrics API: they show on the Ray dashboard and in any
Prometheus that scrapes the cluster (each node exports them on its metrics port).

Worker side (``WorkerMetrics``): every exchange with an endpoint, its latency, and deltas of
the worker's counters. Driver side (``DriverMetrics``): committed shards and rows, failures by
class, endpoint health and replica restarts. Every name starts with ``harvest_``; Ray adds a
``ray_`` prefix on export.
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.util.metrics import Counter, Gauge, Histogram

from workers.stats import LATENCY_BOUNDS_S

# Worker counters exported as deltas (names in the actor's progress/client counters).
WORKER_COUNTERS = {
    "completion_tokens": "harvest_tokens_generated_total",
    "retries": "harvest_retries_total",
    "prompts": "harvest_prompts_answered_total",
}


class WorkerMetrics:
    """One per harvest actor."""

    def __init__(self, job_id: str) -> None:
        self.tags = {"job_id": job_id}
        self.requests = Counter(
            "harvest_requests_total",
            description="Requests sent to teacher endpoints, by endpoint and outcome (HTTP "
            "status, or the error class when no answer came).",
            tag_keys=("job_id", "endpoint", "outcome"),
        )
        self.latency = Histogram(
            "harvest_request_latency_seconds",
            description="Time from sending a request to its answer or error.",
            boundaries=list(LATENCY_BOUNDS_S),
            tag_keys=("job_id", "endpoint"),
        )
        self.counters = {
            key: Counter(name, description=f"Worker counter {key!r}.", tag_keys=("job_id",))
            for key, name in WORKER_COUNTERS.items()
        }
        self._exported: dict[str, int] = {}

    def observe(self, endpoint: str, outcome: str, latency_s: float) -> None:
        tags = {**self.tags, "endpoint": endpoint}
        self.requests.inc(1.0, tags={**tags, "outcome": outcome})
        self.latency.observe(latency_s, tags=tags)

    def export(self, counters: Mapping[str, int]) -> None:
        """Add what the counters grew by since the last export."""
        for key, metric in self.counters.items():
            now = counters.get(key, 0)
            delta = now - self._exported.get(key, 0)
            if delta > 0:
                metric.inc(float(delta), tags=self.tags)
            self._exported[key] = now


class DriverMetrics:
    """One per harvest run, in the driver."""

    def __init__(self, job_id: str) -> None:
        self.tags = {"job_id": job_id}
        job = ("job_id",)
        self.shards = Counter(
            "harvest_shards_committed_total", description="Units committed.", tag_keys=job
        )
        self.rows = Counter(
            "harvest_rows_committed_total",
            description="Records committed, by kind (data or failed).",
            tag_keys=("job_id", "kind"),
        )
        self.failures = Counter(
            "harvest_failures_total",
            description="Prompts that ended in a failure shard, by error class.",
            tag_keys=("job_id", "error_class"),
        )
        self.endpoint_up = Gauge(
            "harvest_endpoint_up",
            description="1 while an endpoint takes requests, 0 while it is out of rotation.",
            tag_keys=("job_id", "endpoint"),
        )
        self.replica_restarts = Gauge(
            "harvest_replica_restarts", description="Managed replica restarts.", tag_keys=job
        )

    def committed(self, data_rows: int, failure_rows: int, error_classes: Mapping[str, int]):
        self.shards.inc(1.0, tags=self.tags)
        for kind, rows in (("data", data_rows), ("failed", failure_rows)):
            if rows:
                self.rows.inc(float(rows), tags={**self.tags, "kind": kind})
        for cls, count in error_classes.items():
            self.failures.inc(float(count), tags={**self.tags, "error_class": cls})

    def health(self, endpoints: list[str], down: set[str], replica_restarts: int) -> None:
        for endpoint in endpoints:
            up = 0.0 if endpoint in down else 1.0
            self.endpoint_up.set(up, tags={**self.tags, "endpoint": endpoint})
        self.replica_restarts.set(float(replica_restarts), tags=self.tags)
