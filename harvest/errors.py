"""Why a harvest run stopped early (driver side; teacher-request errors are in workers.errors)."""

from __future__ import annotations


class JobAborted(RuntimeError):
    """The job stopped early; committed shards are kept and ``harvest run`` resumes."""
