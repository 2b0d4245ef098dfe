"""The harvest actor: one per Ray worker, holding one teacher client across many units.

An async actor, so several units (and ``stats`` polls from the driver) interleave on one event
loop and share the client's connection pool and per-endpoint caps.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import ray

from schemas.job import JobSpec
from schemas.wire import UnitResult, WorkUnit
from workers.round import RoundClients
from workers.shards.columns import warm_up
from workers.storage import StorageOptions, open_store
from workers.teacher.client import TeacherClient
from workers.teacher.limiter import Limiter, worker_share
from workers.teacher.probe import ProbeResult, probe
from workers.teacher.router import EndpointDown
from workers.teacher.stats import RequestSnapshot
from workers.unit import harvest_unit


@dataclass
class WorkerStats:
    counters: dict[str, int]
    down: list[EndpointDown]  # endpoints out of rotation (circuit open, paused by a 429)
    outage: bool  # no endpoint usable: this worker's rows are waiting for the teacher
    in_flight: int  # requests on the wire now
    requests: RequestSnapshot  # by endpoint and outcome, latencies, first failure messages


@ray.remote
class HarvestActor:
    def __init__(
        self,
        spec_json: str,
        *,
        job_id: str,
        out_uri: str,
        storage: dict[str, Any],
        shard_meta: dict[str, Any] | None = None,
        cap_per_endpoint: int,
        api_key: str | None,
        endpoints: list[str],
        student: dict[str, Any] | None = None,
    ) -> None:
        self.spec = JobSpec.model_validate_json(spec_json)
        # Credentials come from this node's environment / credential chain, never from here.
        self.store = open_store(out_uri, StorageOptions(**storage))
        self.shard_meta = shard_meta
        round_job = self.spec.mode == "round"
        teacher_spec = self.spec.teacher_job() if round_job else self.spec
        self.client = TeacherClient(
            teacher_spec,
            job_id=job_id,
            api_key=api_key,
            cap_per_endpoint=cap_per_endpoint,
            endpoints=endpoints,
            limiter=_limiter_share(teacher_spec),
            on_pause=self._tell_peers,
        )
        # Round mode: the student, a client of its own (endpoints, key, caps, limits, retries).
        self.student: TeacherClient | None = None
        self.work: TeacherClient | RoundClients = self.client
        if round_job and student is not None:
            student_spec = self.spec.student_job()
            self.student = TeacherClient(
                student_spec,
                job_id=job_id,
                api_key=student["api_key"],
                cap_per_endpoint=student["cap_per_endpoint"],
                endpoints=student["endpoints"],
                limiter=_limiter_share(student_spec),
                on_pause=self._tell_peers,
            )
            self.work = RoundClients(self.student, self.client)
        self.progress: Counter[str] = Counter()
        self.peers: list[ray.actor.ActorHandle] = []
        warm_up()  # one-time imports now, not in a unit's first row group

    def _tell_peers(self, endpoint: str, until_wall: float) -> None:
        """A 429 paused ``endpoint`` here: the other workers stay away from it too."""
        for peer in self.peers:
            peer.pause_endpoint.remote(endpoint, until_wall)

    async def set_peers(self, peers: list[ray.actor.ActorHandle]) -> None:
        """The other harvest workers of this job (set again when one is replaced)."""
        self.peers = peers

    def _clients(self) -> list[TeacherClient]:
        return [self.client, *([self.student] if self.student else [])]

    async def pause_endpoint(self, endpoint: str, until_wall: float) -> None:
        """Another worker got a 429 from ``endpoint``: no request until ``until_wall``."""
        for client in self._clients():
            if endpoint in client.router.endpoints:
                await client.router.pause_until(endpoint, until_wall)

    async def run_unit(self, unit: WorkUnit) -> UnitResult:
        if self.shard_meta is None:
            raise RuntimeError("a unit before the shard metadata: the driver sets it first")
        node_id = ray.get_runtime_context().get_node_id()
        return await harvest_unit(
            unit, self.work, self.spec, self.store, self.shard_meta, self.progress, node_id
        )

    async def probe(self, kinds: list[str]) -> ProbeResult:
        """Tiny real requests of each kind of row (see ``workers.teacher.probe``); in a round,
        the student is probed too (generating), and its failures are named as the student's."""
        result = await probe(self.client, kinds)
        if self.student is not None and not result.failed:
            sampled = await probe(self.student, kinds)
            result.failed = {k: f"the student: {why}" for k, why in sampled.failed.items()}
        return result

    async def set_shard_meta(self, meta: dict[str, Any]) -> None:
        """The provenance every shard of this worker carries, complete once the probe ran."""
        self.shard_meta = meta

    async def set_endpoints(self, endpoints: list[str]) -> None:
        """A managed replica moved (restarted on a new port): route to the new set."""
        await self.client.router.set_endpoints(endpoints)

    async def set_student_endpoints(self, endpoints: list[str]) -> None:
        """The same for a round's managed student replicas."""
        if self.student is not None:
            await self.student.router.set_endpoints(endpoints)

    async def set_cap(self, cap_per_endpoint: int) -> None:
        """This worker's share of ``in_flight_per_endpoint`` changed (``harvest.driver.pool``)."""
        await self.client.router.set_cap(cap_per_endpoint)

    async def stats(self) -> WorkerStats:
        """Counters since the actor started (prompts done, tokens, failures, retries) and the
        endpoints this worker cannot use now."""
        router = self.client.router
        counters = {
            **self.progress,
            **self.client.counters,
            "circuit_opened": router.circuit_opened,
        }
        down, outage, in_flight = router.down(), router.outage_since is not None, 0
        if self.student is not None:  # a round: the student's requests count as the job's too
            srouter = self.student.router
            for key, value in self.student.counters.items():
                counters[f"student_{key}"] = value
            counters["student_circuit_opened"] = srouter.circuit_opened
            down = [*down, *srouter.down()]
            outage = outage or srouter.outage_since is not None
            in_flight = srouter.in_flight_total()
        return WorkerStats(
            counters=counters,
            down=down,
            outage=outage,
            in_flight=router.in_flight_total() + in_flight,
            requests=self.client.stats.snapshot,
        )

    async def pid(self) -> int:
        """This worker's process id (for operators and fault-injection tests)."""
        return os.getpid()

    async def close(self) -> None:
        await self.client.aclose()
        if self.student is not None:
            await self.student.aclose()


def _limiter_share(spec: JobSpec) -> Limiter | None:
    """This worker's share of the job-wide rate limits (the shares add up to at most the limit).

    Each worker limits itself, with no shared state: a permit is stamped where the request is
    sent, so no network delay can bunch requests past the limit at the teacher.
    """
    limit = spec.teacher.rate_limit
    if not (limit.requests_per_s or limit.tokens_per_min):
        return None
    return Limiter(worker_share(limit, spec.concurrency.workers))
