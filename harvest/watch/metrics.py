"""Prometheus metrics through Ray's metrics API: they show on the Ray dashboard and in any
Prometheus that scrapes the cluster (each node exports them on its metrics port).

Recorded by the driver from what it already gathers every second (the workers' request
statistics and counters, and the units it commits), as deltas: nothing is lost when a worker
is killed before Ray exported its own metrics, and the numbers equal the run's. Every name
starts with ``harvest_``; Ray adds a ``ray_`` prefix on export. A driver process that exits
right after its job may not export the last second or so.
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.util.metrics import Counter, Gauge, Histogram

from workers.teacher.stats import LATENCY_BOUNDS_S, RequestSnapshot

# Worker counters (summed over workers) exported as deltas.
WORKER_COUNTERS = {
    "completion_tokens": "harvest_tokens_generated_total",
    "retries": "harvest_retries_total",
    "prompts": "harvest_prompts_answered_total",
    "batches_split": "harvest_score_batches_split_total",  # score batches sent again row by row
}


class DriverMetrics:
    """One per harvest run, in the driver."""

    def __init__(self, job_id: str) -> None:
        self.tags = {"job_id": job_id}
        job = ("job_id",)
        self.requests = Counter(
            "harvest_requests_total",
            description="Requests sent to teacher endpoints, by endpoint and outcome (HTTP "
            "status, or the error class when no answer came).",
            tag_keys=("job_id", "endpoint", "outcome"),
        )
        self.latency = Histogram(
            "harvest_request_latency_seconds",
            description="Time from sending a request to its answer or error (recorded at the "
            "upper bound of its bucket).",
            boundaries=list(LATENCY_BOUNDS_S),
            tag_keys=job,
        )
        self.counters = {
            key: Counter(name, description=f"Worker counter {key!r}, all workers.", tag_keys=job)
            for key, name in WORKER_COUNTERS.items()
        }
        self._requests: dict[tuple[str, str], int] = {}
        self._buckets = [0] * (len(LATENCY_BOUNDS_S) + 1)
        self._counters: dict[str, int] = {}
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

    def workers(self, counters: Mapping[str, int], requests: RequestSnapshot) -> None:
        """Add what the workers' counters and request statistics grew by since last time."""
        for key, metric in self.counters.items():
            delta = counters.get(key, 0) - self._counters.get(key, 0)
            if delta > 0:
                metric.inc(float(delta), tags=self.tags)
                self._counters[key] = counters.get(key, 0)
        for (endpoint, outcome), count in requests.requests.items():
            delta = count - self._requests.get((endpoint, outcome), 0)
            if delta > 0:
                tags = {**self.tags, "endpoint": endpoint, "outcome": outcome}
                self.requests.inc(float(delta), tags=tags)
                self._requests[(endpoint, outcome)] = count
        bounds = [*LATENCY_BOUNDS_S, 2 * LATENCY_BOUNDS_S[-1]]
        for i, (now, before) in enumerate(
            zip(requests.latency_buckets, self._buckets, strict=True)
        ):
            for _ in range(now - before):
                self.latency.observe(bounds[i], tags=self.tags)
        self._buckets = list(requests.latency_buckets)

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
