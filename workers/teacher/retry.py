"""The one retry policy, built from the job spec with tenacity.

Retryable errors (see ``workers.errors``) are retried with full-jitter exponential backoff,
capped in attempts and in time per request (a wait that would cross the time budget ends the
request instead). When the teacher sends ``Retry-After`` with a 5xx, we wait at least that long:
the server's word beats our backoff, never the other way round.

What a row is charged for: the attempts the client counts (429s and failures of an endpoint
whose circuit then opened are the teacher's fault, not the row's: ``workers.teacher.client``) and
the time spent on its own attempts and backoff. Time spent waiting for a usable endpoint (paused by
a 429, circuit open) is not charged: the router bounds it job-wide with the outage deadline.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from schemas.teacher import TeacherSpec
from workers.errors import RetryableError


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # "inf" or "nan" is no number of seconds; treat as "too long to wait"
        return max(0.0, seconds) if math.isfinite(seconds) else math.inf
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _WaitHonouringRetryAfter:
    """Jittered exponential backoff, but never shorter than the server's Retry-After."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._backoff = wait_random_exponential(multiplier=initial, max=maximum)

    def __call__(self, state: RetryCallState) -> float:
        wait = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return max(wait, retry_after) if retry_after is not None else wait


class _StopBeforeBudget:
    """Stop rather than sleep past the request's time budget, not counting endpoint waits."""

    def __init__(self, budget_s: float, waited_s: Callable[[], float]) -> None:
        self.budget_s, self.waited_s = budget_s, waited_s

    def __call__(self, state: RetryCallState) -> bool:
        spent = (state.seconds_since_start or 0.0) - self.waited_s()
        return spent + (state.upcoming_sleep or 0.0) >= self.budget_s


def build_retrying(spec: TeacherSpec, waited_s: Callable[[], float]) -> AsyncRetrying:
    """A fresh tenacity controller per request (it holds that request's attempt state);
    ``waited_s`` says how long the request has waited for an endpoint so far."""
    return AsyncRetrying(
        retry=retry_if_exception_type(RetryableError),
        # Give up rather than sleep past the request's time budget (a Retry-After on a 5xx
        # longer than what is left ends the request as a failure, never early).
        stop=stop_after_attempt(spec.max_attempts)
        | _StopBeforeBudget(spec.max_request_time_s, waited_s),
        wait=_WaitHonouringRetryAfter(spec.backoff_initial_s, spec.backoff_max_s),
        reraise=True,
    )
