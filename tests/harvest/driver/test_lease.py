"""One driver per output: the lease on a local folder and on a real S3 server.

Staleness is made by state, not by waiting: a lease is aged by rewriting it with a past mtime
(local) or by the holder's TTL being 0 (S3), and heartbeats are observed by their count.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from harvest.driver.lease import LEASE, Lease, LeaseRecord, OutputBusy, pid_space
from workers.storage import StorageError, Store, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "out"))
    return open_store(request.getfixturevalue("s3_prefix"))


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


class _Renewals:
    """A store whose ``replace`` can be held open or answered wrongly, to stage races."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.in_flight = 0
        self.overlapped = False
        self.beat_inside = threading.Event()
        self.go = threading.Event()
        self.hold_first_beat = False
        self.answer_lost: type[BaseException] | None = None  # None: answer None; else raise

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def replace(self, rel: str, data: bytes, token: str) -> str | None:
        self.in_flight += 1
        try:
            if self.in_flight > 1:
                self.overlapped = True
                self.go.set()
            first_beat = threading.current_thread().name == "harvest-lease" and (
                not self.beat_inside.is_set()
            )
            if first_beat and self.hold_first_beat:
                self.beat_inside.set()
                self.go.wait(timeout=2)  # released early if a second renewal comes in
            done = self.store.replace(rel, data, token)
            if self.answer_lost is not None or (first_beat and not self.hold_first_beat):
                self.beat_inside.set()
                if self.answer_lost is not None:
                    raise self.answer_lost("answer lost after the write")
                return None  # a client retry of a swap that did land fails its precondition
            return done
        finally:
            self.in_flight -= 1


def test_heartbeat_and_confirm_never_swap_from_the_same_token(store: Store) -> None:
    """confirm() (before orphans are deleted) racing the heartbeat must not lose the lease."""
    staged = _Renewals(store)
    staged.hold_first_beat = True
    lease = Lease(staged, *_acquired(store, ttl_s=0.3))
    try:
        assert staged.beat_inside.wait(timeout=60), "no heartbeat"
        confirmed: list[bool] = []
        racer = threading.Thread(target=lambda: confirmed.append(lease.confirm()))
        racer.start()
        racer.join(timeout=60)
        assert confirmed == [True] and not staged.overlapped and not lease.lost
    finally:
        lease.release()
    assert not store.exists(LEASE)  # released: the lease was still ours


def test_a_renewal_whose_answer_was_lost_keeps_the_lease(store: Store) -> None:
    staged = _Renewals(store)
    lease = Lease(staged, *_acquired(store, ttl_s=0.3))
    try:
        assert staged.beat_inside.wait(timeout=60), "no heartbeat"
        wait_until(lambda: holder(store).beat >= 2, "heartbeat stopped")
        assert not lease.lost and holder(store).run_id == lease.record.run_id
    finally:
        lease.release()
    assert not store.exists(LEASE)


def test_release_after_a_renewal_that_raised_but_landed_deletes_the_lease(store: Store) -> None:
    staged = _Renewals(store)
    staged.answer_lost = StorageError
    lease = Lease(staged, *_acquired(store, ttl_s=600))  # no heartbeat before release
    with pytest.raises(StorageError):
        lease.confirm()  # it landed: the stored token is no longer the one the lease holds
    assert holder(store).beat == 1
    lease.release()
    assert not store.exists(LEASE)


class _VanishingTemporary:
    """A local store whose first heartbeat write loses its temporary (swept under it)."""

    def __init__(self, store: Store) -> None:
        self.store, self.failed = store, 0

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def replace(self, rel: str, data: bytes, token: str) -> str | None:
        if self.failed == 0:
            self.failed += 1
            raise FileNotFoundError(2, "No such file or directory", ".tmp-swept")
        return self.store.replace(rel, data, token)


def test_a_renewal_whose_temporary_vanished_is_retried_next_beat(tmp_path) -> None:
    store = open_store(str(tmp_path / "out"))
    flaky = _VanishingTemporary(store)
    lease = Lease(flaky, *_acquired(store, ttl_s=0.3))
    try:
        wait_until(lambda: holder(store).beat >= 2, "heartbeat stopped after the failed write")
        assert flaky.failed == 1 and not lease.lost and lease._thread.is_alive()
    finally:
        lease.release()
    assert not store.exists(LEASE)


def _acquired(store: Store, ttl_s: float) -> tuple[LeaseRecord, str]:
    """Acquire through the real store, then hand the record and token to a staged Lease."""
    real = Lease.acquire(store, ttl_s=ttl_s)
    real._stop.set()
    real._thread.join()
    return real.record, real.token
