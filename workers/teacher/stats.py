"""What a worker's requests did: counts by endpoint and outcome, latencies, first errors.

Plain Python, owned by the teacher client; the harvest actor hands a snapshot to the driver,
which turns the sum of all workers' snapshots into the status file, logs and metrics.
Latencies go into fixed buckets, so snapshots from many workers add up exactly.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

# Upper bounds (seconds) of the latency buckets; the last bucket is everything above.
LATENCY_BOUNDS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FAILURE_SAMPLES = 3  # messages kept per error class, for the log


@dataclass
class RequestSnapshot:
    """A worker's request statistics since it started; snapshots add up with ``merge``."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (endpoint, outcome)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_S) + 1))
    errors: dict[str, list[str]] = field(default_factory=dict)  # every error class seen
    failures: dict[str, list[str]] = field(default_factory=dict)  # rows that gave up

    def merge(self, other: RequestSnapshot) -> None:
        self.requests.update(other.requests)
        pairs = zip(self.latency_buckets, other.latency_buckets, strict=True)
        self.latency_buckets = [a + b for a, b in pairs]
        for mine_by_class, theirs_by_class in ((self.errors, other.errors),
                                               (self.failures, other.failures)):  # fmt: skip
            for cls, messages in theirs_by_class.items():
                mine = mine_by_class.setdefault(cls, [])
                mine.extend(messages[: FAILURE_SAMPLES - len(mine)])

    def latency_percentile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the ``q`` quantile (None: no request yet)."""
        total = sum(self.latency_buckets)
        if not total:
            return None
        seen = 0
        for i, count in enumerate(self.latency_buckets):
            seen += count
            if seen >= q * total:
                return LATENCY_BOUNDS_S[i] if i < len(LATENCY_BOUNDS_S) else float("inf")
        return float("inf")


class RequestStats:
    def __init__(self) -> None:
        self.snapshot = RequestSnapshot()

    def observe(self, endpoint: str, outcome: str, latency_s: float) -> None:
        """One HTTP exchange with a teacher endpoint: ``outcome`` is the status code or the
        error class when there was no answer."""
        snap = self.snapshot
        snap.requests[(endpoint, outcome)] += 1
        snap.latency_buckets[bisect.bisect_left(LATENCY_BOUNDS_S, latency_s)] += 1

    def error(self, error_class: str, message: str) -> None:
        """An attempt failed (it may be retried): keep the first few messages of each class."""
        _keep(self.snapshot.errors, error_class, message)

    def failed(self, error_class: str, message: str) -> None:
        """A row's request gave up: keep the first few messages of each class."""
        _keep(self.snapshot.failures, error_class, message)


def _keep(by_class: dict[str, list[str]], error_class: str, message: str) -> None:
    kept = by_class.setdefault(error_class, [])
    if len(kept) < FAILURE_SAMPLES:
        kept.append(message[:500])
