"""The actor pool and the dispatch loop shared by `harvest run` and `harvest retry-failed`.

At most ``2 x workers`` units are in flight, so driver memory stays flat however large the input.
A worker that dies or becomes unreachable mid-unit is killed (so it can no longer write), then
replaced, and its unit re-run by the new actor; each attempt writes under its own shard names
and only the one the driver commits counts (``harvest.outputs.manifest``).
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from harvest.driver import stopping
from harvest.driver.preflight import PreflightError, above_cap_line, classify_logprob_mode
from harvest.errors import JobAborted
from harvest.watch.monitor import Monitor
from schemas.job import JobSpec
from schemas.wire import UnitResult, WorkUnit
from workers.actor import HarvestActor
from workers.errors import FatalError, TeacherOutage
from workers.teacher.router import EndpointDown
from workers.teacher.stats import RequestSnapshot

UNIT_CRASH_LIMIT = 3  # a unit that kills this many workers is a bug to report, not retry forever


@dataclass
class PoolStats:
    counters: Counter[str]
    down: dict[str, EndpointDown]  # endpoint -> why and since when, as one worker saw it
    outage: bool  # some worker has no usable endpoint: its rows wait for the teacher
    in_flight: int
    requests: RequestSnapshot


class Pool:
    """Harvest actors and the units in flight on each; replaces actors that die."""

    def __init__(self, spec: JobSpec, actor_kwargs: dict[str, Any]) -> None:
        self.spec, self.kwargs = spec, actor_kwargs
        self.actors = [self._new() for _ in range(spec.concurrency.workers)]
        self._share_peers()
        self.load = [0] * len(self.actors)
        self.in_flight: dict[ray.ObjectRef, tuple[int, ray.actor.ActorHandle, WorkUnit]] = {}
        self.crashes: Counter[str] = Counter()
        self.restarts = 0
        self._caps: dict[int, int] = {}  # slot -> the cap share last sent to its worker

    def _new(self) -> ray.actor.ActorHandle:
        cpus = self.spec.concurrency.worker_cpus
        return HarvestActor.options(
            num_cpus=cpus, max_concurrency=1000, scheduling_strategy="SPREAD"
        ).remote(self.spec.model_dump_json(), **self.kwargs)

    def _share_peers(self) -> None:
        """Each worker learns the others, to pass on endpoint pauses (429 Retry-After)."""
        for actor in self.actors:
            actor.set_peers.remote([a for a in self.actors if a is not actor])

    def submit(self, unit: WorkUnit) -> None:
        slot = min(range(len(self.actors)), key=self.load.__getitem__)
        self.load[slot] += 1
        actor = self.actors[slot]
        self.in_flight[actor.run_unit.remote(unit)] = (slot, actor, unit)

    def crashed(self, slot: int, actor: ray.actor.ActorHandle, unit: WorkUnit) -> None:
        """Re-run ``unit`` on a fresh actor (one replacement per dead actor, not per unit).

        Ray also reports an actor that is only unreachable for now (``ActorUnavailableError``)
        this way; it may still be writing the unit's shard, so it is killed before the unit
        runs again: two writers of one shard name must never overlap."""
        ray.kill(actor, no_restart=True)
        self.crashes[unit.unit_id] += 1
        if self.crashes[unit.unit_id] >= UNIT_CRASH_LIMIT:
            raise JobAborted(f"unit {unit.unit_id} crashed {UNIT_CRASH_LIMIT} workers")
        if self.actors[slot] is actor:
            self.actors[slot] = self._new()
            self._caps.pop(slot, None)  # the new worker starts with the even share
            self.restarts += 1
            self._share_peers()
        self.submit(unit)

    def share_caps(self) -> None:
        """Once every unit is handed out, the workers that still have units get the whole
        in-flight cap. Split evenly among all workers, a worker with no unit left holds its
        share idle: a job of one unit ran at half the cap, and every job's tail did."""
        caps = cap_shares(self.load, self.spec.concurrency.in_flight_per_endpoint)
        for slot, cap in caps.items():
            if self._caps.get(slot) != cap:
                self.actors[slot].set_cap.remote(cap)
        self._caps.update(caps)

    def set_endpoints(self, endpoints: list[str]) -> None:
        """Route every worker, present and future, to a new endpoint set."""
        self.kwargs["endpoints"] = endpoints
        for actor in self.actors:
            actor.set_endpoints.remote(endpoints)

    def set_shard_meta(self, meta: dict[str, Any]) -> None:
        """Hand every worker, present and future, the provenance its shards carry (the
        workers write nothing before: the probe that completes it runs on one of them)."""
        self.kwargs["shard_meta"] = meta
        ray.get([actor.set_shard_meta.remote(meta) for actor in self.actors])

    def stats(self) -> PoolStats:
        total = PoolStats(Counter(), {}, False, 0, RequestSnapshot())
        try:
            for s in ray.get([a.stats.remote() for a in self.actors], timeout=5):
                total.counters.update(s.counters)
                for d in s.down:
                    total.down.setdefault(d.endpoint, d)
                total.outage |= s.outage
                total.in_flight += s.in_flight
                total.requests.merge(s.requests)
        except (RayActorError, GetTimeoutError):
            pass  # a dying actor: its unit is re-run; progress catches up next poll
        return total

    def shutdown(self) -> None:
        for ref in list(self.in_flight):
            ray.cancel(ref, force=False)
        for actor in self.actors:
            ray.kill(actor)


def units_at_once(in_flight_per_endpoint: int, endpoints: int, workers: int, rows: int) -> int:
    """Units each worker runs at once: two (one finishing while the next starts), or as many
    as it takes for small units (``rows`` requests each) to fill the worker's share of the
    in-flight cap, so that a small ``output.rows_per_shard`` never starves the teacher."""
    share = -(-in_flight_per_endpoint * max(1, endpoints) // max(1, workers))
    return max(2, -(-share // max(1, rows)) + 1)


def cap_shares(load: list[int], in_flight: int) -> dict[int, int]:
    """Each busy worker's share (slot -> cap) of ``in_flight`` requests per endpoint."""
    busy = [slot for slot, units in enumerate(load) if units]
    return {slot: -(-in_flight // len(busy)) for slot in busy}


def dispatch(
    pool: Pool,
    units: Iterator[WorkUnit],
    commit: Callable[[UnitResult], None],
    monitor: Monitor,
    *,
    done_before: int,
    stop_deadline_s: float,
    on_tick: Callable[[], None] | None = None,
    replica_restarts: Callable[[], int] = lambda: 0,
) -> tuple[int, bool]:
    """Run ``units`` through ``pool``, committing each result; return (prompts, interrupted)."""
    stop = StopFlag(stop_deadline_s)
    committed = 0
    exhausted = False
    stop_at: float | None = None
    spec = pool.spec
    endpoints = (
        spec.teacher.replicas.count if spec.teacher.replicas else len(spec.teacher.endpoints)
    )
    at_once = 2  # per worker; grows once the units' size is known
    try:
        with stop:
            while True:
                if stop.requested and stop_at is None:
                    stop_at = time.monotonic() + stop_deadline_s
                    monitor.note("stopping: finishing the units in flight (Ctrl-C again: now)")
                while (
                    not exhausted
                    and not stop.requested
                    and (len(pool.in_flight) < at_once * len(pool.actors))
                ):
                    unit = next(units, None)
                    if unit is None:
                        exhausted = True
                    else:
                        pool.submit(unit)
                        at_once = max(at_once, units_at_once(
                            spec.concurrency.in_flight_per_endpoint, endpoints,
                            len(pool.actors), len(unit.rows),
                        ))  # fmt: skip
                if exhausted:
                    pool.share_caps()
                if not pool.in_flight or (stop_at is not None and time.monotonic() > stop_at):
                    break
                ready, _ = ray.wait(list(pool.in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    slot, actor, unit = pool.in_flight.pop(ref)
                    pool.load[slot] -= 1
                    try:
                        result: UnitResult = ray.get(ref)
                    except RayActorError:
                        pool.crashed(slot, actor, unit)
                        continue
                    commit(result)
                    committed += result.prompts
                    monitor.committed(
                        result.data_rows, result.failure_rows, result.error_classes, result.prompts
                    )
                if on_tick is not None:
                    on_tick()
                live = pool.stats()
                monitor.tick(
                    committed_prompts=committed,
                    counters=live.counters,
                    down=list(live.down.values()),
                    outage=live.outage,
                    in_flight=live.in_flight,
                    requests=live.requests,
                    worker_restarts=pool.restarts,
                    replica_restarts=replica_restarts(),
                )
    except TeacherOutage as err:
        raise JobAborted(str(getattr(err, "cause", err))) from None
    except FatalError as err:
        raise JobAborted(f"teacher error stopped the job: {getattr(err, 'cause', err)}") from None
    except RayTaskError as err:
        raise JobAborted(f"a worker failed: {err.cause!r}") from None
    finally:
        pool.shutdown()
    return committed, stop.requested


class StopFlag:
    """Turn the first SIGINT/SIGTERM into a graceful stop; a second one interrupts at once.
    The first also arms the process's last resort (``harvest.driver.stopping``): whatever blocks,
    the driver ends ``stop_deadline_s`` (plus a shutdown grace) after it."""

    def __init__(self, stop_deadline_s: float = 60.0) -> None:
        self.requested = False
        self.stop_deadline_s = stop_deadline_s
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        stopping.arm(self.stop_deadline_s)

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def probe_teacher(worker: ray.actor.ActorHandle, kinds: list[str], k: int) -> tuple[str, str]:
    """Tiny real requests from a harvest worker, one per kind of row the input holds, at the
    job's K; a teacher that cannot serve one stops the job. Returns the server's logprob mode
    and how it was told (``harvest.driver.preflight.classify_logprob_mode``)."""
    try:
        result = ray.get(worker.probe.remote(kinds))
    except TeacherOutage as err:  # died after the driver's checks: the outage stop, exit 1
        raise JobAborted(str(getattr(err, "cause", err))) from None
    except RayTaskError as err:
        raise PreflightError(f"teacher probe request failed: {err.cause}") from None
    if result.above_cap:
        raise PreflightError(above_cap_line(k, result.max_logprobs))
    if result.failed:  # one line, for the first kind (chat is probed first)
        kind, why = next(iter(result.failed.items()))
        raise PreflightError(f"teacher cannot serve {kind} rows at logprobs={k}: {why}")
    if result.mode_error:
        return "unknown", f"the second mode probe failed: {result.mode_error}"
    return classify_logprob_mode(result.tops)
