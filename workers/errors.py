"""Why a teacher request failed, and what to do about it.

Every failure the client raises is one of these classes; each branch has exactly one action::

    HarvestError
    ├── RetryableError          retry with backoff (tenacity), honouring Retry-After
    │   ├── TeacherUnavailable  connection refused/reset, protocol error
    │   ├── TeacherTimeout      connect/read/write timeout
    │   ├── RateLimited         HTTP 429 (retry_after from the header)
    │   ├── ServerError         HTTP 408 and 5xx
    │   └── InvalidResponse     body that is not the JSON we asked for
    ├── RowError                record a failure row for this request; no retry
    │   ├── BadRequest          HTTP 400, 422 and other 4xx the row itself causes
    │   └── MissingLogprobs     a 200 answer without the logprobs we asked for
    └── FatalError              stop the job early, keep what was written
        ├── AuthError           HTTP 401 / 403
        └── ModelNotFound       HTTP 404 (wrong model name or base URL)

Classification uses status codes and exception types only, never message text.
"""

from __future__ import annotations


class HarvestError(Exception):
    """Base of every teacher-request failure."""

    http_status: int | None = None

    def __init__(self, message: str, *, http_status: int | None = None, endpoint: str = "") -> None:
        super().__init__(message)
        self.http_status = http_status
        self.endpoint = endpoint
        self.attempts = 1  # set by the client: how many attempts this request had


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


class MissingLogprobs(RowError):
    """A 200 answer lacking the requested logprobs: unusable for distillation."""


class FatalError(HarvestError):
    """No request of this job can succeed: stop early."""


class AuthError(FatalError):
    """HTTP 401/403: the key is wrong or lacks access."""


class ModelNotFound(FatalError):
    """HTTP 404: the model name or base URL is wrong."""


def error_for_status(status: int, message: str, *, retry_after: float | None, endpoint: str):
    """Map a non-2xx HTTP status to the class that decides the action."""
    kw = {"http_status": status, "endpoint": endpoint}
    if status == 429:
        return RateLimited(message, retry_after=retry_after, **kw)
    if status == 408 or status >= 500:
        return ServerError(message, retry_after=retry_after, **kw)
    if status in (401, 403):
        return AuthError(message, **kw)
    if status == 404:
        return ModelNotFound(message, **kw)
    return BadRequest(message, **kw)
