"""Counting events in sliding time windows, for rate-limit assertions."""

from __future__ import annotations


def max_in_window(times: list[float], window: float) -> int:
    """The most events inside any half-open window of ``window`` seconds."""
    times, best, start = sorted(times), 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best
