"""One driver per output: the lease on a local folder and on a real S3 server.

Staleness is made by state, not by waiting: a lease is aged by rewriting it with a past mtime
(local) or by the holder's TTL being 0 (S3), and heartbeats are observed by their count.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from harvest.lease import LEASE, Lease, LeaseRecord, OutputBusy, pid_space
from workers.storage import Store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "out"))
    return Store(request.getfixturevalue("s3_prefix"))


def holder(store: Store) -> LeaseRecord:
    return LeaseRecord.model_validate_json(store.read_bytes(LEASE))


def wait_until(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_second_driver_refused_with_one_line_naming_the_holder(store: Store) -> None:
    with Lease.acquire(store, ttl_s=600) as lease:
        assert holder(store).run_id == lease.record.run_id
        with pytest.raises(OutputBusy) as exc:
            Lease.acquire(store, ttl_s=600)
        msg = str(exc.value)
        assert "\n" not in msg and store.uri in msg
        assert f"pid {os.getpid()} on {socket.gethostname()}" in msg
        assert f"since {lease.record.since}" in msg
    assert not store.exists(LEASE)  # released
    Lease.acquire(store, ttl_s=600).release()  # and free again


def test_stale_lease_is_taken_over_once(store: Store) -> None:
    dead = Lease.acquire(store, ttl_s=0)  # a driver whose TTL has already run out...
    dead._stop.set()  # ...and whose heartbeat died with it (SIGKILL)
    dead._thread.join()
    if store.is_local:  # age it by state: an mtime in the past
        path = store.path(LEASE)
        os.utime(path, (os.stat(path).st_atime, os.stat(path).st_mtime - 5))
    wait_until(lambda: store.read_versioned(LEASE).age_s > 0, "lease never aged")
    taker = Lease.acquire(store, ttl_s=600)
    try:
        assert holder(store).run_id == taker.record.run_id != dead.record.run_id
        with pytest.raises(OutputBusy):
            Lease.acquire(store, ttl_s=600)  # the new holder is fresh
    finally:
        taker.release()
    dead.release()  # no longer ours: must not delete anything
    assert not store.exists(LEASE)


def test_heartbeat_renews_and_notices_a_takeover(store: Store) -> None:
    lease = Lease.acquire(store, ttl_s=0.3)
    try:
        wait_until(lambda: holder(store).beat >= 2, "no heartbeat")
        assert holder(store).run_id == lease.record.run_id
        current = store.read_versioned(LEASE)
        intruder = holder(store).model_copy(update={"run_id": "intruder", "beat": 0})
        assert store.replace(LEASE, intruder.model_dump_json().encode(), current.token)
        wait_until(lambda: lease.lost, "takeover not noticed")
    finally:
        lease.release()
    assert holder(store).run_id == "intruder"  # a lost lease is not deleted by its old holder


def _planted(store: Store, pid: int, space: str) -> None:
    record = LeaseRecord(host="h", pid=pid, run_id="old", since="then", ttl_s=600, pid_space=space)
    assert store.create(LEASE, record.model_dump_json().encode())


def test_a_killed_holder_in_our_pid_space_is_known_dead_at_once(store: Store) -> None:
    """No waiting for the TTL when the holder's process is gone from this very PID space."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()  # its pid now names no process
    _planted(store, child.pid, pid_space())
    lease = Lease.acquire(store, ttl_s=600)
    try:
        assert holder(store).run_id == lease.record.run_id
    finally:
        lease.release()


@pytest.mark.parametrize("space", ["another-boot/pid:[1]", ""])
def test_a_holder_elsewhere_is_waited_for(store: Store, space: str) -> None:
    """Another host or container (or one that could not tell): its pid means nothing here."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    _planted(store, child.pid, space)
    with pytest.raises(OutputBusy, match=f"pid {child.pid} on h since then"):
        Lease.acquire(store, ttl_s=600)
