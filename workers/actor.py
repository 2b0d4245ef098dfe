"""The harvest actor: one per Ray worker, holding one teacher client across many units.

An async actor, so several units (and ``stats`` polls from the driver) interleave on one event
loop and share the client's connection pool and per-endpoint caps.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import ray

from schemas.job import JobSpec, RateLimit
from schemas.wire import UnitResult, WorkUnit
from workers.client import TeacherClient
from workers.limiter import Limiter
from workers.unit import harvest_unit


@ray.remote(num_cpus=0)
class RateLimiterActor:
    """The job's one limiter, shared by every worker so the limits hold job-wide."""

    def __init__(self, spec_json: str) -> None:
        self.limiter = Limiter(RateLimit.model_validate_json(spec_json))

    async def acquire(self, max_tokens: int) -> int:
        return await self.limiter.acquire(max_tokens)

    async def settle(self, handle: int, used_tokens: int) -> None:
        await self.limiter.settle(handle, used_tokens)


class RemoteLimiter:
    """Client-side view of ``RateLimiterActor`` (satisfies ``workers.client.RateLimiter``)."""

    def __init__(self, actor: ray.actor.ActorHandle) -> None:
        self.actor = actor

    async def acquire(self, max_tokens: int) -> int:
        return await self.actor.acquire.remote(max_tokens)

    async def settle(self, handle: int, used_tokens: int) -> None:
        await self.actor.settle.remote(handle, used_tokens)


@ray.remote
class HarvestActor:
    def __init__(
        self,
        spec_json: str,
        *,
        job_id: str,
        out_dir: str,
        shard_meta: dict[str, Any],
        cap_per_endpoint: int,
        api_key: str | None,
        limiter: ray.actor.ActorHandle | None = None,
    ) -> None:
        self.spec = JobSpec.model_validate_json(spec_json)
        self.out_dir = Path(out_dir)
        self.shard_meta = shard_meta
        self.client = TeacherClient(
            self.spec,
            job_id=job_id,
            api_key=api_key,
            cap_per_endpoint=cap_per_endpoint,
            limiter=RemoteLimiter(limiter) if limiter is not None else None,
        )
        self.progress: Counter[str] = Counter()

    async def run_unit(self, unit: WorkUnit) -> UnitResult:
        return await harvest_unit(
            unit, self.client, self.spec, self.out_dir, self.shard_meta, self.progress
        )

    async def stats(self) -> dict[str, int]:
        """Counters since the actor started: prompts done, tokens, failures, retries."""
        return {**self.progress, **self.client.counters}

    async def pid(self) -> int:
        """This worker's process id (for operators and fault-injection tests)."""
        return os.getpid()

    async def close(self) -> None:
        await self.client.aclose()
