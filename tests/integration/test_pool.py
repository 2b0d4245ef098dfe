"""The actor pool on a real Ray cluster: a worker whose unit is re-run can no longer write."""

from __future__ import annotations

import jobs
import pytest
import ray
from ray.exceptions import RayActorError

from harvest.driver.pool import Pool
from schemas.wire import WorkUnit

pytestmark = pytest.mark.integration


def test_a_worker_reported_lost_is_killed_before_its_unit_runs_again(tmp_path, ray_cluster):
    """Ray reports an actor it cannot reach (``ActorUnavailableError``) like a dead one, but that
    actor may still be running the unit and writing its shard: it must be gone before the unit
    is submitted to a new actor."""
    spec = jobs.spec(
        jobs.model("m", "http://127.0.0.1:9/v1"),  # never contacted: the unit is empty
        concurrency={"workers": 2, "worker_cpus": 0.1},
    )
    kwargs = {
        "job_id": "j",
        "out_uri": str(tmp_path),
        "storage": {},
        "shard_meta": {},
        "cap_per_endpoint": 1,
        "api_key": None,
        "endpoints": spec.teacher.endpoints,
    }
    pool = Pool(spec, kwargs)
    try:
        old = pool.actors[0]
        assert ray.get(old.pid.remote(), timeout=60) > 0  # alive and serving
        pool.crashed(0, old, WorkUnit("u-000000", []))
        with pytest.raises(RayActorError):
            ray.get(old.pid.remote(), timeout=60)
        assert pool.actors[0] is not old and pool.restarts == 1
        ((ref, (slot, actor, unit)),) = pool.in_flight.items()
        assert slot == 0
        assert actor is pool.actors[0] and unit.unit_id == "u-000000"
        assert ray.get(ref, timeout=60).unit_id == "u-000000"  # re-run on the new actor
    finally:
        pool.shutdown()
