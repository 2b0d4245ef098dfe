"""The driver's scheduler: fan work units out to harvest actors and commit their shards.

Memory stays flat however large the input: units are generated lazily from the input files and
at most ``2 x workers`` are in flight. The driver alone writes the manifest, after a unit's
shards are on disk, so a crash at any point leaves a folder that ``harvest run`` resumes.
A worker that dies mid-unit has its unit re-run by a fresh actor; the shard names are the unit's,
so the re-run overwrites and never duplicates.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from harvest.manifest import Manifest
from harvest.preflight import TeacherInfo, check_teacher, read_api_key
from harvest.progress import Progress
from harvest.sources import iter_units, scan
from schemas.job import JobSpec
from schemas.records import SCHEMA_VERSION
from schemas.wire import UnitResult, WorkUnit
from workers import __version__
from workers.actor import HarvestActor, RateLimiterActor, RemoteLimiter
from workers.errors import FatalError

UNIT_CRASH_LIMIT = 3  # a unit that kills this many workers is a bug to report, not retry forever


class JobAborted(RuntimeError):
    """The job stopped early; committed shards are kept and ``harvest run`` resumes."""


@dataclass
class Summary:
    out_dir: str
    job_id: str
    prompts: int
    prompts_this_run: int = 0
    data_rows: int = 0
    failure_rows: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    endpoint_requests: Counter[str] = field(default_factory=Counter)
    error_classes: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    worker_restarts: int = 0
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["endpoint_requests"] = dict(self.endpoint_requests)
        out["error_classes"] = dict(self.error_classes)
        return out

    def add(self, r: UnitResult | dict[str, Any]) -> None:
        get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
        self.data_rows += get("data_rows")
        self.failure_rows += get("failure_rows")
        self.completion_tokens += get("completion_tokens")
        self.endpoint_requests.update(get("endpoint_requests"))
        self.error_classes.update(get("error_classes"))
        self.retries += get("retries")


def init_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (as under ``ray job submit``), or start a private one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)


def _shard_meta(spec: JobSpec, job_id: str, teacher: TeacherInfo) -> dict[str, Any]:
    """Provenance stamped on every shard: who authorised what, from which teacher, how."""
    return {
        "schema_version": SCHEMA_VERSION,
        "harvest_version": __version__,
        "job_id": job_id,
        "teacher": teacher.identity(),
        "authorization": spec.teacher.authorization.model_dump(),
        "sampling": spec.sampling.model_dump(),
        "logprob_mode": "raw: the model's logprobs before temperature and top-p (vLLM default)",
        "spec": spec.model_dump(mode="json"),
        "run_started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


class _Pool:
    """Harvest actors and the units in flight on each; replaces actors that die."""

    def __init__(self, spec: JobSpec, kwargs: dict[str, Any]) -> None:
        self.spec, self.kwargs = spec, kwargs
        self.actors = [self._new() for _ in range(spec.concurrency.workers)]
        self.load = dict.fromkeys(range(len(self.actors)), 0)
        self.in_flight: dict[ray.ObjectRef, tuple[int, WorkUnit]] = {}
        self.crashes: Counter[str] = Counter()
        self.restarts = 0

    def _new(self) -> ray.actor.ActorHandle:
        cpus = self.spec.concurrency.worker_cpus
        return HarvestActor.options(num_cpus=cpus, max_concurrency=1000).remote(
            self.spec.model_dump_json(), **self.kwargs
        )

    def submit(self, unit: WorkUnit) -> None:
        slot = min(self.load, key=self.load.__getitem__)
        self.load[slot] += 1
        self.in_flight[self.actors[slot].run_unit.remote(unit)] = (slot, unit)

    def finish(self, ref: ray.ObjectRef) -> tuple[int, WorkUnit]:
        slot, unit = self.in_flight.pop(ref)
        self.load[slot] -= 1
        return slot, unit

    def replace(self, slot: int) -> None:
        self.actors[slot] = self._new()
        self.restarts += 1

    def stats(self) -> Counter[str]:
        total: Counter[str] = Counter()
        try:
            for s in ray.get([a.stats.remote() for a in self.actors], timeout=5):
                total.update(s)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            pass  # a dying actor: its unit is re-run; progress catches up next poll
        return total


def run_job(
    spec: JobSpec,
    out_dir: Path,
    *,
    force_new: bool = False,
    ray_address: str | None = None,
    show_progress: bool = True,
    stop_deadline_s: float = 60.0,
) -> Summary:
    """Harvest ``spec`` into ``out_dir``, resuming whatever it already holds."""
    started = time.monotonic()
    inputs = scan(spec)
    manifest = Manifest.open(
        out_dir,
        spec_fp=spec.fingerprint(),
        input_fp=inputs.fingerprint,
        teacher=spec.teacher.model,
        force_new=force_new,
    )
    api_key = read_api_key(spec)
    init_ray(ray_address)
    limiter = None
    if spec.teacher.rate_limit.requests_per_s or spec.teacher.rate_limit.tokens_per_min:
        limiter = RateLimiterActor.remote(spec.teacher.rate_limit.model_dump_json())
    teacher = check_teacher(
        spec, api_key, manifest.job_id, RemoteLimiter(limiter) if limiter is not None else None
    )
    manifest.check_teacher(teacher.identity())
    summary = Summary(str(out_dir), manifest.job_id, prompts=inputs.rows)
    done_before = 0
    for unit in manifest.units.values():
        summary.add(unit)
        done_before += unit["prompts"]
    summary.endpoint_requests.clear()
    summary.error_classes.clear()
    summary.retries = 0  # per-run counters; rows and tokens above are cumulative

    per_unit = max(1, spec.output.rows_per_shard // spec.sampling.n)
    units: Iterator[WorkUnit] = (
        u for u in iter_units(inputs.files, spec, per_unit) if u.unit_id not in manifest.units
    )
    workers = spec.concurrency.workers
    pool = _Pool(
        spec,
        {
            "job_id": manifest.job_id,
            "out_dir": str(out_dir.resolve()),
            "shard_meta": _shard_meta(spec, manifest.job_id, teacher),
            "cap_per_endpoint": -(-spec.concurrency.in_flight_per_endpoint // workers),
            "api_key": api_key,
            "limiter": limiter,
        },
    )
    progress = Progress(inputs.rows, done_before, enabled=show_progress)
    stopping = _StopFlag()
    committed_this_run = 0
    try:
        with stopping:
            exhausted = False
            stop_at: float | None = None
            while True:
                if stopping.requested and stop_at is None:
                    stop_at = time.monotonic() + stop_deadline_s
                    summary.interrupted = True
                    progress.note("stopping: finishing units in flight, then exiting")
                while (
                    not exhausted and not stopping.requested and len(pool.in_flight) < 2 * workers
                ):
                    unit = next(units, None)
                    if unit is None:
                        exhausted = True
                    else:
                        pool.submit(unit)
                if not pool.in_flight:
                    break
                if stop_at is not None and time.monotonic() > stop_at:
                    break
                ready, _ = ray.wait(list(pool.in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    slot, unit = pool.finish(ref)
                    try:
                        result: UnitResult = ray.get(ref)
                    except RayActorError:
                        pool.crashes[unit.unit_id] += 1
                        if pool.crashes[unit.unit_id] >= UNIT_CRASH_LIMIT:
                            raise JobAborted(
                                f"unit {unit.unit_id} crashed {UNIT_CRASH_LIMIT} workers"
                            ) from None
                        pool.replace(slot)
                        pool.submit(unit)
                        continue
                    manifest.commit(result)
                    summary.add(result)
                    committed_this_run += result.prompts
                live = pool.stats()
                progress.update(
                    done=done_before + committed_this_run,
                    in_unit=live["prompts"] - committed_this_run,
                    tokens=live["completion_tokens"],
                    failures=live["failed_prompts"],
                )
    except FatalError as err:
        raise JobAborted(f"teacher error stopped the job: {err}") from None
    except RayTaskError as err:
        raise JobAborted(f"a worker failed: {err.cause!r}") from None
    finally:
        progress.close()
        for ref in list(pool.in_flight):
            ray.cancel(ref, force=False)
        for actor in pool.actors:
            ray.kill(actor)
    summary.prompts_this_run = committed_this_run
    summary.worker_restarts = pool.restarts
    summary.elapsed_s = time.monotonic() - started
    return summary


class _StopFlag:
    """Turn the first SIGINT/SIGTERM into a graceful stop; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
