"""Kill the teacher at many moments of a job: it stops at the outage deadline, or goes on.

One harvest worker's whole path in-process, against the fault teacher on a real socket: the
driver's preflight checks, the worker's probe, then units two at a time (as the driver keeps
them in flight). The teacher dies when its N-th ``/v1/completions`` request arrives (the
server's own stamp ``down_at``), killed (every connection reset) or shut down gracefully (new
connections refused, requests in service answered: the way the circuit once opened and the
outage clock never armed), or it is down before the job starts or between the probe and the
first unit. Every moment must end in ``TeacherOutage`` no sooner than ``outage_timeout_s``
after the death and within a few seconds of it, with no failure row, and a rerun of the
unfinished units once the teacher is back must leave exactly the job's request ids, once each.
The job itself, through Ray and the CLI, is in tests/integration/test_outage.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import jobs
import pyarrow.parquet as pq
import pytest
from fault_teacher_server import FaultPlan, FaultTeacherServer

from harvest.driver.preflight import check_teacher
from harvest.errors import JobAborted
from schemas.wire import PromptRow, UnitResult, WorkUnit, request_id
from workers.errors import TeacherOutage
from workers.storage import Store, open_store
from workers.teacher.client import TeacherClient, sampling_for
from workers.teacher.probe import probe
from workers.unit import harvest_unit

OUTAGE_S = 1.0
MARGIN_S = 5.0  # detection and a loaded machine; the deadline itself is exact
ROWS, PER_UNIT = 40, 8
PROBES = 3  # the probe's /v1/completions requests: chat, completions, the mode probe


def spec(url: str, outage_s: float = OUTAGE_S):
    settings = {"timeout_s": 2.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.5}
    return jobs.spec(
        jobs.model("fault", url, outage_timeout_s=outage_s, **settings),
        sampling={"max_tokens": 4, "n": 2, "logprobs": 3},
        concurrency={"workers": 1, "in_flight_per_endpoint": 4},
    )


def units() -> list[WorkUnit]:
    rows = [
        PromptRow(f"p{i}", f"in:{i}", messages=[{"role": "user", "content": f"chat {i}"}])
        if i % 3 == 0
        else PromptRow(f"p{i}", f"in:{i}", prompt=f"row {i}")
        for i in range(ROWS)
    ]
    return [WorkUnit(f"u{i:03d}", rows[i : i + PER_UNIT]) for i in range(0, ROWS, PER_UNIT)]


def expected_ids(job) -> set[str]:
    return {
        request_id(row.prompt_id, s, "fault", sampling_for(job, row))
        for unit in units()
        for row in unit.rows
        for s in range(2)
    }


async def harvest(
    job, todo: list[WorkUnit], store: Store, after_probe=None
) -> tuple[list[UnitResult], float]:
    """The driver's checks, the probe, then ``todo`` two units at a time; the units that
    committed, and when it ended. Raises the first error that stopped it."""
    done: list[UnitResult] = []
    await asyncio.to_thread(check_teacher, job, None, "j")
    client = TeacherClient(job, job_id="j")
    try:
        await probe(client, ["chat", "completions"])
        if after_probe is not None:
            after_probe()
        slots = asyncio.Semaphore(2)

        async def one(unit: WorkUnit) -> None:
            async with slots:
                done.append(await harvest_unit(unit, client, job, store, {"job_id": "j"}))

        try:
            async with asyncio.TaskGroup() as group:
                for unit in todo:
                    group.create_task(one(unit))
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from None
    finally:
        await client.aclose()
        harvest.committed = done  # type: ignore[attr-defined]
    return done, time.monotonic()


def stopped(
    job, todo: list[WorkUnit], store: Store, after_probe=None
) -> tuple[BaseException, list[UnitResult]]:
    harvest.committed = []  # type: ignore[attr-defined]
    bound = job.teacher.outage_timeout_s + MARGIN_S + 30  # a hang fails, never blocks the suite
    try:
        asyncio.run(asyncio.wait_for(harvest(job, todo, store, after_probe), bound))
    except (TeacherOutage, JobAborted) as err:
        return err, harvest.committed  # type: ignore[attr-defined]
    except TimeoutError:
        raise AssertionError(f"the job hung: no outage stop within {bound:g} s") from None
    raise AssertionError("the job did not stop")


def data_ids(out: Path) -> list[str]:
    return [
        i
        for f in sorted(out.glob("data/*.parquet"))
        for i in pq.read_table(f)["request_id"].to_pylist()
    ]


def check_rerun(job, server: FaultTeacherServer, out: Path, done: list[UnitResult]) -> None:
    """No failure row; the teacher back, the units that did not commit complete the job."""
    assert not list(out.glob("failed/*")) and all(r.failure_rows == 0 for r in done)
    assert len({r.unit_id for r in done}) == len(done)
    server.come_back()
    todo = [u for u in units() if u.unit_id not in {r.unit_id for r in done}]
    rest, _ = asyncio.run(harvest(job, todo, open_store(str(out))))
    assert sorted(r.unit_id for r in done + rest) == [u.unit_id for u in units()]
    ids = data_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(job)
    assert not list(out.glob("failed/*"))


# Kill moments: during the probe (1-3), on the first unit's first requests, mid-job with
# requests in flight, and on the last rows; killed or shut down gracefully. The job sends 43
# requests in all, so the last moment is the 42nd: a graceful stop at the 43rd still answers
# it, and the job rightly finishes with nothing left to send.
MOMENTS = [(n, graceful) for n in (1, 3, 4, 6, 11, 17, 24, 30, 37, 42) for graceful in (0, 1)]


@pytest.mark.parametrize(("down_after", "graceful"), MOMENTS)
def test_teacher_dies_after_its_nth_request(tmp_path, down_after, graceful):
    plan = FaultPlan(latency_s=0.02, down_after=down_after, down_graceful=bool(graceful))
    with FaultTeacherServer(model="fault", plan=plan) as server:
        job = spec(server.url)
        err, done = stopped(job, units(), open_store(str(tmp_path)))
        ended = time.monotonic()
        assert server.down_at is not None
        assert "teacher.outage_timeout_s" in str(err)
        assert OUTAGE_S <= ended - server.down_at < OUTAGE_S + MARGIN_S
        if down_after <= PROBES:
            assert not done  # stopped in the probe
        check_rerun(job, server, tmp_path, done)


@pytest.mark.parametrize("moment", ["before the preflight", "between the probe and the units"])
def test_teacher_down_with_no_request_in_flight(tmp_path, moment):
    with FaultTeacherServer(model="fault") as server:
        job = spec(server.url)
        down: list[float] = []

        def die() -> None:
            server.go_down()
            down.append(time.monotonic())

        if moment == "before the preflight":
            die()
        # else: once the probe has its answers, before any unit: nothing on the wire then
        err, done = stopped(job, units(), open_store(str(tmp_path)), None if down else die)
        ended = time.monotonic()
        down_at = down[0]
        assert "teacher.outage_timeout_s" in str(err) and not done
        assert OUTAGE_S <= ended - down_at < OUTAGE_S + MARGIN_S
        check_rerun(job, server, tmp_path, done)


@pytest.mark.parametrize("when", ["before the preflight", "mid-job"])
def test_teacher_back_before_the_deadline_the_job_goes_on(tmp_path, when):
    plan = FaultPlan(latency_s=0.02, down_after=0 if when == "before the preflight" else 17)
    with FaultTeacherServer(model="fault", plan=plan) as server:
        job = spec(server.url, outage_s=60)
        if when == "before the preflight":
            server.go_down()

        def back_soon() -> None:  # once the server itself saw the death (or at once)
            while when == "mid-job" and server.down_at is None:
                time.sleep(0.01)
            time.sleep(0.5)
            server.come_back()

        helper = threading.Thread(target=back_soon)
        helper.start()
        done, _ = asyncio.run(harvest(job, units(), open_store(str(tmp_path))))
        helper.join()
    assert all(r.failure_rows == 0 for r in done) and not list(tmp_path.glob("failed/*"))
    ids = data_ids(tmp_path)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(job)
