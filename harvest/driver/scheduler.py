"""The driver's scheduler: fan work units out to harvest actors and commit their shards.

Units are generated lazily from the input files (``harvest.driver.pool`` bounds how many are in
flight). The driver holds the output's lease (``harvest.driver.lease``) and alone commits units
(``harvest.outputs.manifest``), after their shards are stored, so a crash at any point leaves an
output that ``harvest run`` resumes without duplicates, on a local folder or an object store alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

from harvest.driver.cluster import ClusterUnavailable, init_ray
from harvest.driver.lease import Lease
from harvest.driver.options import RunOptions
from harvest.driver.pool import JobAborted, Pool, dispatch, probe_teacher
from harvest.driver.preflight import TeacherInfo, check_teacher, read_api_key
from harvest.driver.reach import warn_if_nothing_listens
from harvest.driver.replicas import ReplicaError, ReplicaSet
from harvest.driver.rounds import Student, start_student
from harvest.driver.summary import Summary
from harvest.inputs.sources import iter_units, scan
from harvest.outputs.manifest import Manifest, UnitCommit
from harvest.outputs.provenance import check_logprob_mode
from harvest.watch.monitor import watched_run
from harvest.watch.progress import Progress
from harvest.watch.status import JobStatus
from schemas.job import JobSpec
from schemas.records import SCHEMA_VERSION
from schemas.wire import UnitResult, WorkUnit
from workers import __version__
from workers.storage import Store, open_store

__all__ = ["ClusterUnavailable", "JobAborted", "ReplicaError", "RunOptions", "Summary", "run_job"]


def _shard_meta(
    started: _Started, spec: JobSpec, job_id: str, mode: str, how: str
) -> dict[str, Any]:
    """Provenance stamped on every shard, built once, after the probe has found the server's
    logprob mode: who authorised what, from which teacher (and student), how."""
    meta = {
        "schema_version": SCHEMA_VERSION,
        "harvest_version": __version__,
        "job_id": job_id,
        "teacher": started.teacher.identity(),
        "authorization": spec.teacher.authorization.model_dump(),
        "mode": spec.mode,  # generate, score (the teacher scored given text) or round
        "sampling": spec.sampling.model_dump(),
        "logprob_mode": mode,  # what the server runs (vLLM's --logprobs-mode), as probed
        "logprob_mode_how": how,
        "spec": spec.model_dump(mode="json"),
        "run_started_at": started.at,
    }
    if started.student is not None:
        meta.update(started.student.meta(spec))
    return meta


@dataclass
class _Started:
    actor_kwargs: dict[str, Any]
    replicas: ReplicaSet | None
    teacher: TeacherInfo
    student: Student | None = None  # round mode
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def follow_replicas(self, pool: Pool) -> None:
        """Hand restarted replicas' new URLs to the workers (called between dispatch steps)."""
        urls = self.replicas.poll() if self.replicas else None
        if urls:
            pool.set_endpoints(urls)
        moved = self.student.replicas.poll() if self.student and self.student.replicas else None
        if moved:
            pool.kwargs["student"]["endpoints"] = moved
            for actor in pool.actors:
                actor.set_student_endpoints.remote(moved)

    def stop(self) -> None:
        if self.replicas:
            self.replicas.stop()
        if self.student:
            self.student.stop()


def _start(spec: JobSpec, manifest: Manifest, ray_address: str | None) -> _Started:
    """Join Ray, launch managed replicas, check the teacher, build the workers' arguments."""
    api_key = read_api_key(spec)
    if spec.teacher.replicas is None:  # said before Ray's start-up, not 10-20 s after it
        warn_if_nothing_listens(spec.teacher.endpoints, spec.teacher.outage_timeout_s)
    init_ray(ray_address)
    replicas = None
    endpoints = spec.teacher.endpoints
    if spec.teacher.replicas is not None:
        replicas = ReplicaSet(spec.teacher.replicas, spec.teacher.model, _replica_logs(manifest))
        endpoints = replicas.wait_ready()
    student = None
    try:
        teacher = check_teacher(spec, api_key, manifest.job_id, endpoints)
        manifest.check_teacher(teacher.identity())
        if spec.mode == "round":
            logs = _replica_logs(manifest) / "student"
            student = start_student(spec, manifest.job_id, teacher, logs)
    except BaseException:
        if replicas:
            replicas.stop()
        raise
    workers = spec.concurrency.workers
    kwargs = {
        "job_id": manifest.job_id,
        "out_uri": manifest.store.uri,
        "storage": manifest.store.options.to_dict(),  # endpoint and region; no credentials
        "cap_per_endpoint": -(-spec.concurrency.in_flight_per_endpoint // workers),
        "api_key": api_key,
        "endpoints": endpoints,
    }
    if student is not None:
        kwargs["student"] = student.actor_kwargs(spec)
    return _Started(kwargs, replicas, teacher, student)


def _probed_pool(
    spec: JobSpec, started: _Started, kinds: frozenset[str], manifest: Manifest
) -> Pool:
    """Workers whose teacher answered a tiny request of each kind of row, at the job's K, in
    the logprob mode of the shards the output already holds."""
    pool = Pool(spec, started.actor_kwargs)
    try:
        mode, how = probe_teacher(pool.actors[0], sorted(kinds), spec.sampling.logprobs)
        check_logprob_mode(manifest, mode)
        pool.set_shard_meta(_shard_meta(started, spec, manifest.job_id, mode, how))
    except BaseException:
        pool.shutdown()
        raise
    return pool


def _replica_logs(manifest: Manifest) -> Path:
    """Replica server logs stay on the driver's disk (beside a local output)."""
    if manifest.store.is_local:
        return Path(manifest.store.root) / "_replicas"
    return Path.home() / ".cache" / "teacher-harvest" / "replicas" / manifest.job_id


def _units_per_shard(spec: JobSpec) -> int:
    return max(1, spec.output.rows_per_shard // spec.sampling.n)


def _open_store(out: str) -> Store:
    """The output store, checked before anything else runs (bad credentials, missing bucket
    and unreachable endpoints fail here, in one line naming the URI)."""
    store = open_store(out)
    store.check()
    return store


@dataclass
class Work:
    """What one run sends: its units, how each result is committed, and what status counts."""

    units: Iterator[WorkUnit]
    commit: Callable[[UnitResult], UnitCommit | None]
    kinds: frozenset[str]  # chat / completions: the kinds the preflight probe sends
    total: int  # prompts this run is about (status and progress)
    done_before: int = 0


def _guarded(lease: Lease, commit: Callable[[UnitResult], UnitCommit | None], summary: Summary):
    def run(result: UnitResult) -> None:
        if lease.lost:
            raise JobAborted(f"another driver took {lease.store.uri} over; this run stops")
        record = commit(result)
        if record is not None:
            summary.add(record)

    return run


def drive(
    store: Store,
    spec: JobSpec,
    prompts: int,
    open_manifest: Callable[[], Manifest],
    plan: Callable[[Manifest, Summary], Work | None],
    options: RunOptions,
) -> Summary:
    """The one skeleton of ``harvest run`` and ``retry-failed``: take the lease, open the
    manifest, plan the work, run it (no Ray starts when there is none), settle the totals and
    sweep what no commit names, if the lease is still ours. A plan of None (nothing to retry)
    leaves the output as it is."""
    t0 = time.monotonic()
    with Lease.acquire(store) as lease:
        manifest = open_manifest()
        summary = Summary(store.uri, manifest.job_id, prompts=prompts, mode=spec.mode)
        summary.resume(list(manifest.units.values()))
        work = plan(manifest, summary)
        if work is not None:
            first = next(work.units, None)  # a rerun with nothing left starts no Ray
            if first is not None:
                work.units = chain([first], work.units)
                commit = _guarded(lease, work.commit, summary)
                _harvest(spec, manifest, work, commit, summary, options)
            summary.settle(list(manifest.units.values()))
            if lease.confirm():  # never delete what a driver that took over may be writing
                manifest.sweep()  # shards of attempts that crashed or lost a race in this run
    summary.elapsed_s = time.monotonic() - t0
    return summary


def _harvest(
    spec: JobSpec,
    manifest: Manifest,
    work: Work,
    commit: Callable[[UnitResult], None],
    summary: Summary,
    options: RunOptions,
) -> None:
    """Start workers (and replicas), run the work's units, always stop what was started."""
    started = _start(spec, manifest, options.ray_address)
    try:
        pool = _probed_pool(spec, started, work.kinds, manifest)
        status = JobStatus(
            job_id=manifest.job_id,
            prompts_total=work.total,
            prompts_done=work.done_before,
            data_rows=summary.data_rows,
            failure_rows=summary.failure_rows,
            tokens=summary.completion_tokens,
        )
        progress = Progress(
            work.total,
            work.done_before,
            enabled=options.show_progress,
            outage_timeout_s=spec.teacher.outage_timeout_s,
            every_s=options.status_every_s,
        )
        endpoints = started.actor_kwargs["endpoints"]
        out = manifest.store.uri
        every = options.status_every_s
        with watched_run(out, status, progress, endpoints, spec, every) as monitor:
            if started.replicas:
                monitor.replicas = started.replicas.status
            summary.prompts_this_run, summary.interrupted = dispatch(
                pool,
                work.units,
                commit,
                monitor,
                done_before=work.done_before,
                stop_deadline_s=options.stop_deadline_s,
                on_tick=lambda: started.follow_replicas(pool),
                replica_restarts=lambda: started.replicas.restarts if started.replicas else 0,
            )
            if summary.interrupted:
                monitor.end("stopped", "interrupted by SIGINT/SIGTERM; rerun to resume")
    finally:
        started.stop()
    summary.replica_restarts = started.replicas.restarts if started.replicas else 0
    summary.worker_restarts = pool.restarts


def run_job(
    spec: JobSpec, out: str | Path, *, force_new: bool = False, options: RunOptions | None = None
) -> Summary:
    """Harvest ``spec`` into ``out`` (a folder or URI), resuming whatever it already holds."""
    inputs = scan(spec)
    store = _open_store(str(out))

    def open_manifest() -> Manifest:
        return Manifest.open(store, spec=spec, input_fp=inputs.fingerprint, force_new=force_new)

    def plan(manifest: Manifest, summary: Summary) -> Work:
        units = (
            u
            for u in iter_units(inputs.files, spec, _units_per_shard(spec))
            if u.unit_id not in manifest.units
        )
        done = sum(u.base.prompts for u in manifest.units.values())
        return Work(units, manifest.commit, inputs.kinds, inputs.rows, done)

    return drive(store, spec, inputs.rows, open_manifest, plan, options or RunOptions())
