"""Check the teacher before any prompt is sent: reachable, serving the model, returning ids.

A job that cannot work should fail in seconds with one clear line, not after an hour of
failure rows: an unreachable endpoint, a wrong model name, a bad key, or a server that does not
return token ids and logprobs (only vLLM-compatible servers do) all stop the job here.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import httpx

from schemas.job import JobSpec
from schemas.wire import PromptRow
from workers import USER_AGENT
from workers.client import TeacherClient
from workers.errors import HarvestError


class PreflightError(RuntimeError):
    """The teacher cannot serve this job; the message says which endpoint and why."""


@dataclass(frozen=True)
class TeacherInfo:
    endpoints: list[str]  # the endpoints that answered
    model: str
    model_root: str | None  # what the server says it loaded (path or hub id)
    max_model_len: int | None


def read_api_key(spec: JobSpec) -> str | None:
    name = spec.teacher.api_key_env
    if name is None:
        return None
    key = os.environ.get(name)
    if not key:
        raise PreflightError(f"teacher.api_key_env: environment variable {name} is not set")
    return key


def _models(endpoint: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    try:
        resp = httpx.get(f"{endpoint}/models", headers=headers, timeout=10.0)
    except httpx.HTTPError as err:
        raise PreflightError(f"teacher {endpoint} unreachable: {type(err).__name__}") from None
    if resp.status_code in (401, 403):
        raise PreflightError(f"teacher {endpoint} refused our API key (HTTP {resp.status_code})")
    if resp.status_code != 200:
        raise PreflightError(f"teacher {endpoint}/models answered HTTP {resp.status_code}")
    try:
        return list(resp.json()["data"])
    except (ValueError, KeyError, TypeError):
        raise PreflightError(f"teacher {endpoint}/models is not an OpenAI model list") from None


def check_teacher(spec: JobSpec, api_key: str | None, job_id: str) -> TeacherInfo:
    """Every endpoint must list the model; one probe request must return ids and logprobs."""
    headers = {"User-Agent": USER_AGENT, "X-Harvest-Job-Id": job_id}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    found: dict[str, Any] = {}
    for endpoint in spec.teacher.endpoints:
        models = {m.get("id"): m for m in _models(endpoint, headers)}
        if spec.teacher.model not in models:
            raise PreflightError(
                f"teacher {endpoint} does not serve model {spec.teacher.model!r} "
                f"(it serves {sorted(map(str, models))})"
            )
        found = models[spec.teacher.model]
    asyncio.run(_probe(spec, api_key, job_id))
    return TeacherInfo(
        endpoints=list(spec.teacher.endpoints),
        model=spec.teacher.model,
        model_root=found.get("root"),
        max_model_len=found.get("max_model_len"),
    )


async def _probe(spec: JobSpec, api_key: str | None, job_id: str) -> None:
    client = TeacherClient(spec, job_id=job_id, api_key=api_key)
    probe = PromptRow("preflight", "preflight", prompt="Hello", overrides={"max_tokens": 2, "n": 1})
    try:
        await client.complete(probe)
    except HarvestError as err:
        raise PreflightError(f"teacher probe request failed: {err}") from None
    finally:
        await client.aclose()
