"""The driver's scheduler: fan work units out to harvest actors and commit their shards.

Units are generated lazily from the input files (``harvest.driver.pool`` bounds how many are in
flight). The driver holds the output's lease (``harvest.driver.lease``) and alone commits units
(``harvest.outputs.manifest``), after their shards are stored, so a crash at any point leaves an
output that ``harvest run`` resumes without duplicates, on a local folder or an object store alike.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

import ray

from harvest.driver.lease import Lease
from harvest.driver.pool import JobAborted, Pool, dispatch, probe_teacher
from harvest.driver.preflight import TeacherInfo, check_teacher, read_api_key
from harvest.driver.reach import warn_if_nothing_listens
from harvest.driver.replicas import ReplicaError, ReplicaSet
from harvest.driver.rounds import Student, start_student
from harvest.inputs.sources import iter_units, scan
from harvest.outputs.manifest import Manifest, UnitCommit, UnitState
from harvest.outputs.provenance import check_logprob_mode
from harvest.watch.logs import event, ray_logging_level
from harvest.watch.monitor import watched_run
from harvest.watch.progress import Progress
from harvest.watch.status import JobStatus
from schemas.job import JobSpec
from schemas.records import SCHEMA_VERSION
from schemas.wire import UnitResult, WorkUnit
from workers import __version__
from workers.storage import Store, open_store

__all__ = ["ClusterUnavailable", "JobAborted", "ReplicaError", "Summary", "run_job"]


class ClusterUnavailable(RuntimeError):
    """The Ray cluster named by --ray-address / $RAY_ADDRESS cannot be joined."""


@dataclass
class Summary:
    """What ``harvest run`` / ``retry-failed`` report: this run's work (``run_*``, ``retries``,
    ``endpoint_requests``, ``error_classes``) apart from the output as a whole (``data_rows``,
    ``failure_rows``, ``completion_tokens``), so a rate never mixes the two."""

    out_dir: str
    job_id: str
    prompts: int
    mode: str = "generate"  # score: the tokens are the given text's, scored
    prompts_this_run: int = 0
    data_rows: int = 0  # the output as a whole, after this run
    failure_rows: int = 0
    completion_tokens: int = 0
    prompts_done: int = 0
    run_data_rows: int = 0  # this run's commits
    run_failure_rows: int = 0
    run_tokens: int = 0
    run_failed_prompts: int = 0
    not_retried: Counter[str] = field(default_factory=Counter)  # retry-failed: class -> prompts
    elapsed_s: float = 0.0
    endpoint_requests: Counter[str] = field(default_factory=Counter)
    error_classes: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    worker_restarts: int = 0
    replica_restarts: int = 0
    units_by_node: Counter[str] = field(default_factory=Counter)
    interrupted: bool = False

    @property
    def tokens_per_s(self) -> float:
        """This run's tokens over this run's time (earlier runs' tokens never count)."""
        return self.run_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        """``_summary.json``: the run's figures and the output's, in labelled sections."""
        return {
            "job_id": self.job_id,
            "out_dir": self.out_dir,
            "interrupted": self.interrupted,
            "this_run": {
                "prompts": self.prompts_this_run,
                "harvested_prompts": self.prompts_this_run - self.run_failed_prompts,
                "failed_prompts": self.run_failed_prompts,
                "not_retried": dict(self.not_retried),
                "data_rows": self.run_data_rows,
                "failure_rows": self.run_failure_rows,
                "tokens": self.run_tokens,
                "tokens_are": "scored" if self.mode == "score" else "completion",
                "elapsed_s": self.elapsed_s,
                "tokens_per_s": self.tokens_per_s,
                "requests_by_endpoint": dict(self.endpoint_requests),
                "failed_prompts_by_class": dict(self.error_classes),
                "retries": self.retries,
                "worker_restarts": self.worker_restarts,
                "replica_restarts": self.replica_restarts,
                "units_by_node": dict(self.units_by_node),
            },
            "output": {
                "prompts": self.prompts,
                "prompts_done": self.prompts_done,
                "data_rows": self.data_rows,
                "failure_rows": self.failure_rows,
                "tokens": self.completion_tokens,
            },
        }

    def add(self, c: UnitCommit) -> None:
        """Count a commit made by this run (a unit's first harvest, or a retry of it)."""
        self.run_data_rows += c.data_rows
        self.run_failure_rows += c.failure_rows
        self.run_tokens += c.completion_tokens
        self.run_failed_prompts += sum(c.error_classes.values())
        self.endpoint_requests.update(c.endpoint_requests)
        self.error_classes.update(c.error_classes)
        self.retries += c.retries
        if c.node_id:
            self.units_by_node[c.node_id] += 1

    def resume(self, units: list[UnitState]) -> None:
        """Start from what earlier runs committed (the output's totals before this run)."""
        self.settle(units)

    def settle(self, units: list[UnitState]) -> None:
        """The output's totals, from its committed units."""
        self.data_rows = sum(u.data_rows for u in units)
        self.failure_rows = sum(u.failure_rows for u in units)
        self.completion_tokens = sum(u.completion_tokens for u in units)
        self.prompts_done = sum(u.base.prompts for u in units)


_QUIET = "1"  # the value quiet_ray sets (a user's own setting is left alone)


def quiet_ray() -> None:
    """Keep Ray's own prints off the terminal unless ``--log-level debug``: the "Unhandled
    error" tracebacks of tasks the driver gave up on when a job stops (their failure is
    reported once, in harvest's own line) and the raylet's "(raylet) A worker died ..."
    paragraphs (a replica's death is reported by harvest's restart line). With debug they
    print as Ray prints them."""
    from ray._private import worker as ray_worker

    shown = getattr(ray_worker.print_to_stdstream, "__wrapped__", ray_worker.print_to_stdstream)
    if ray_logging_level() <= logging.DEBUG:
        ray_worker.print_to_stdstream = shown
        if os.environ.get("RAY_IGNORE_UNHANDLED_ERRORS") == _QUIET:
            del os.environ["RAY_IGNORE_UNHANDLED_ERRORS"]
        return
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", _QUIET)  # read at each unhandled error

    def to_debug_log(data: dict[str, Any], ignore_prefix: bool) -> None:
        for line in data.get("lines", []):
            event("ray_message", f"({data.get('pid')}) {line}", logging.DEBUG)

    to_debug_log.__wrapped__ = shown  # type: ignore[attr-defined]
    # Ray's error listener thread calls the module's function by name at each message.
    ray_worker.print_to_stdstream = to_debug_log


def init_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (as under ``ray job submit``), or start a private one."""
    quiet_ray()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=ray_logging_level())
        except (ConnectionError, RuntimeError) as err:
            raise ClusterUnavailable(
                f"cannot join the Ray cluster at {address} ({type(err).__name__}); if it uses "
                "token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"
            ) from None
    else:
        # Ray runs its workers at nice 15; on a machine shared with the teacher (or any other
        # busy process) that starves the harvest workers' event loops, and the teacher then
        # runs fewer requests at once (bench/README.md, "Teacher saturation").
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=ray_logging_level(),
        )


def _shard_meta(spec: JobSpec, job_id: str, teacher: TeacherInfo) -> dict[str, Any]:
    """Provenance stamped on every shard: who authorised what, from which teacher, how."""
    return {
        "schema_version": SCHEMA_VERSION,
        "harvest_version": __version__,
        "job_id": job_id,
        "teacher": teacher.identity(),
        "authorization": spec.teacher.authorization.model_dump(),
        "mode": spec.mode,  # generate, score (the teacher scored given text) or round
        "sampling": spec.sampling.model_dump(),
        # Replaced by what the preflight probe finds the server runs (vLLM's --logprobs-mode).
        "logprob_mode": "unknown",
        "logprob_mode_how": "not probed yet",
        "spec": spec.model_dump(mode="json"),
        "run_started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@dataclass
class _Started:
    actor_kwargs: dict[str, Any]
    replicas: ReplicaSet | None
    student: Student | None = None  # round mode

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
        "shard_meta": _shard_meta(spec, manifest.job_id, teacher),
        "cap_per_endpoint": -(-spec.concurrency.in_flight_per_endpoint // workers),
        "api_key": api_key,
        "endpoints": endpoints,
    }
    if student is not None:
        kwargs["shard_meta"].update(student.meta(spec))
        kwargs["student"] = student.actor_kwargs(spec)
    return _Started(kwargs, replicas, student)


def _probed_pool(
    spec: JobSpec, started: _Started, kinds: frozenset[str], manifest: Manifest
) -> Pool:
    """Workers whose teacher answered a tiny request of each kind of row, at the job's K, in
    the logprob mode of the shards the output already holds."""
    pool = Pool(spec, started.actor_kwargs)
    try:
        mode, how = probe_teacher(pool.actors[0], sorted(kinds), spec.sampling.logprobs)
        check_logprob_mode(manifest, mode)
        # The pool builds replacement workers from these same kwargs: they stamp it too.
        started.actor_kwargs["shard_meta"].update(logprob_mode=mode, logprob_mode_how=how)
        ray.get([actor.set_logprob_mode.remote(mode, how) for actor in pool.actors])
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


def _guarded(lease: Lease, commit: Callable[[UnitResult], UnitCommit | None], summary: Summary):
    def run(result: UnitResult) -> None:
        if lease.lost:
            raise JobAborted(f"another driver took {lease.store.uri} over; this run stops")
        record = commit(result)
        if record is not None:
            summary.add(record)

    return run


def _harvest(
    spec: JobSpec,
    manifest: Manifest,
    units: Iterator[WorkUnit],
    commit: Callable[[UnitResult], None],
    summary: Summary,
    *,
    kinds: frozenset[str],
    total: int,
    done_before: int,
    ray_address: str | None,
    show_progress: bool,
    status_every_s: float,
    stop_deadline_s: float,
) -> None:
    """Start workers (and replicas), run ``units`` through them, always stop what was started."""
    started = _start(spec, manifest, ray_address)
    try:
        pool = _probed_pool(spec, started, kinds, manifest)
        status = JobStatus(
            job_id=manifest.job_id,
            prompts_total=total,
            prompts_done=done_before,
            data_rows=summary.data_rows,
            failure_rows=summary.failure_rows,
            tokens=summary.completion_tokens,
        )
        progress = Progress(
            total,
            done_before,
            enabled=show_progress,
            outage_timeout_s=spec.teacher.outage_timeout_s,
            every_s=status_every_s,
        )
        endpoints = started.actor_kwargs["endpoints"]
        out = manifest.store.uri
        with watched_run(out, status, progress, endpoints, spec, status_every_s) as monitor:
            if started.replicas:
                monitor.replicas = started.replicas.status
            summary.prompts_this_run, summary.interrupted = dispatch(
                pool,
                units,
                commit,
                monitor,
                done_before=done_before,
                stop_deadline_s=stop_deadline_s,
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
    spec: JobSpec,
    out: str | Path,
    *,
    force_new: bool = False,
    ray_address: str | None = None,
    show_progress: bool = True,
    status_every_s: float = 5.0,
    stop_deadline_s: float = 60.0,
) -> Summary:
    """Harvest ``spec`` into ``out`` (a folder or URI), resuming whatever it already holds."""
    t0 = time.monotonic()
    inputs = scan(spec)
    store = _open_store(str(out))
    with Lease.acquire(store) as lease:
        manifest = Manifest.open(store, spec=spec, input_fp=inputs.fingerprint, force_new=force_new)
        summary = Summary(store.uri, manifest.job_id, prompts=inputs.rows, mode=spec.mode)
        summary.resume(list(manifest.units.values()))
        done_before = sum(u.base.prompts for u in manifest.units.values())
        units = (
            u
            for u in iter_units(inputs.files, spec, _units_per_shard(spec))
            if u.unit_id not in manifest.units
        )
        first = next(units, None)  # a rerun with nothing left starts no Ray, keeps the status
        if first is not None:
            _harvest(
                spec, manifest, chain([first], units), _guarded(lease, manifest.commit, summary),
                summary, kinds=inputs.kinds, total=inputs.rows, done_before=done_before,
                ray_address=ray_address, show_progress=show_progress,
                status_every_s=status_every_s, stop_deadline_s=stop_deadline_s,
            )  # fmt: skip
        summary.settle(list(manifest.units.values()))
        if lease.confirm():  # never delete what a driver that took over may be writing
            manifest.sweep()  # shards of attempts that crashed or lost a race in this run
    summary.elapsed_s = time.monotonic() - t0
    return summary
