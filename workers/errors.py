"""Why a teacher request failed, and what to do about it.

Every failure the client raises is one of these classes; each branch has exactly one action::

    HarvestError
    ├── RetryableError          retry with backoff (tenacity), honouring Retry-After
    │   ├── TeacherUnavailable  connection refused/reset, protocol error
    │   ├── TeacherTimeout      connect/read/write timeout
    │   ├── ServerError         HTTP 408 and 5xx
    │   │   └── RateLimited     HTTP 429: pause the endpoint for every request (never a row's
    │   │                       attempt; see workers.teacher.router)
    │   └── InvalidResponse     body that is not the JSON shape we asked for
    ├── RowError                record a failure row for this request; no retry
    │   ├── BadRequest          HTTP 400, 422 and other 4xx the row itself causes
    │   │   └── LogprobsAboveCap  HTTP 400 naming a logprobs parameter: K is above the
    │   │                       server's --max-logprobs (the preflight stops the job)
    │   ├── MissingLogprobs     a 200 answer without the logprobs we asked for
    │   └── InvalidInput        a row the teacher cannot score as given (score mode)
    └── FatalError              stop the job early, keep what was written
        ├── AuthError           HTTP 401 / 403
        ├── ModelNotFound       HTTP 404 (wrong model name or base URL)
        └── TeacherOutage       no endpoint usable for teacher.outage_timeout_s

Classification uses status codes and exception types only, never message text. Endpoint
failures (unavailable, timeout, 5xx) count as a row's attempt only while the endpoint is
otherwise healthy: once its circuit opens, the teacher is at fault and the row waits instead.
"""

from __future__ import annotations

import copy
import re


class HarvestError(Exception):
    """Base of every teacher-request failure."""

    http_status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        endpoint: str = "",
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.endpoint = endpoint
        self.attempts = attempts  # attempts the request had when it gave up

    def final(self, *, attempts: int, endpoint: str) -> HarvestError:
        """A new, complete error of the same class: how the request ended after ``attempts``."""
        done = copy.copy(self)
        done.attempts = attempts
        done.endpoint = self.endpoint or endpoint
        done.__cause__ = self.__cause__
        return done


class RetryableError(HarvestError):
    """Transient: the same request may succeed later."""

    retry_after: float | None = None


class TeacherUnavailable(RetryableError):
    """The connection failed (refused, reset, closed mid-answer)."""


class TeacherTimeout(RetryableError):
    """No answer within the request timeout."""


class ServerError(RetryableError):
    """HTTP 408 or 5xx."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class RateLimited(ServerError):
    """HTTP 429: the teacher asks us to slow down; the wait it names is always honoured."""


class InvalidResponse(RetryableError):
    """The body was truncated or is not the JSON shape we asked for."""


class RowError(HarvestError):
    """This request can never succeed as sent: it becomes a failure record."""


class BadRequest(RowError):
    """HTTP 400/422 (e.g. prompt longer than the context window)."""


class LogprobsAboveCap(BadRequest):
    """HTTP 400 whose structured error names a logprobs parameter (vLLM's ``param``:
    ``logprobs``, ``top_logprobs`` or ``prompt_logprobs``): the job's K is above the server's
    ``--max-logprobs``. Every row would fail the same way, so the preflight probe stops the job.

    ``max_allowed`` is the server's cap when its message states it, else None."""

    def __init__(self, message: str, *, max_allowed: int | None = None, **kw) -> None:
        super().__init__(message, **kw)
        self.max_allowed = max_allowed


LOGPROB_PARAMS = frozenset({"logprobs", "top_logprobs", "prompt_logprobs"})
# vLLM 0.32's body is {"error": {"message": "Requested sample logprobs of 129, which is greater
# than max allowed: 128 (...)", "param": "logprobs", ...}}: the class comes from the structured
# "param" field; the cap itself is in no structured field, so the message text is all there is.
_MAX_ALLOWED = re.compile(r"max allowed: (\d+)")


def max_allowed_of(message: str) -> int | None:
    """The cap a vLLM logprobs refusal states in its message text, or None."""
    found = _MAX_ALLOWED.search(message)
    return int(found.group(1)) if found else None


class MissingLogprobs(RowError):
    """A 200 answer lacking the requested logprobs: unusable for distillation."""


class InvalidInput(RowError):
    """Score mode: the row cannot be scored as the teacher tokenises it (e.g. the chat template
    renders a conversation's prefix differently from the start of the whole conversation, so
    the assistant turns cannot be located). The same class names rows the input reader refused."""


class FatalError(HarvestError):
    """No request of this job can succeed: stop early."""


class AuthError(FatalError):
    """HTTP 401/403: the key is wrong or lacks access."""


class ModelNotFound(FatalError):
    """HTTP 404: the model name or base URL is wrong."""


class TeacherOutage(FatalError):
    """Every endpoint has been down (circuit open or paused by 429) for the outage timeout.

    The rows waiting are not at fault, so none becomes a failure record: the job stops and a
    rerun resumes once the teacher is back."""


def error_for_status(
    status: int,
    message: str,
    *,
    retry_after: float | None,
    endpoint: str,
    param: str | None = None,
):
    """Map a non-2xx HTTP status (and, for 400, the body's structured ``param``) to the class
    that decides the action."""
    kw = {"http_status": status, "endpoint": endpoint}
    if status == 429:
        return RateLimited(message, retry_after=retry_after, **kw)
    if status == 408 or status >= 500:
        return ServerError(message, retry_after=retry_after, **kw)
    if status in (401, 403):
        return AuthError(message, **kw)
    if status == 404:
        return ModelNotFound(message, **kw)
    if status == 400 and param in LOGPROB_PARAMS:
        return LogprobsAboveCap(message, max_allowed=max_allowed_of(message), **kw)
    return BadRequest(message, **kw)
