"""The base of every job-spec model and the checks several of them share."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict


class SpecError(ValueError):
    """The job file cannot be used; the message names the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def no_credentials(location: str) -> str:
    """Reject ``s3://KEY:SECRET@bucket`` and the like: credentials live in the environment."""
    if "://" in location:
        parts = urlsplit(location)
        if parts.username or parts.password:
            raise ValueError(
                "credentials do not belong in a location; use the environment (e.g. "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the standard credential chain"
            )
    return location
