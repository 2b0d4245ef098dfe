"""One driver per output: a lease object with a heartbeat, on any store.

``harvest run`` and ``harvest retry-failed`` hold ``_harvest/lease.json`` (host, pid, since when,
TTL) for as long as they run:

- **Acquire**: create the object with a conditional create (S3 ``If-None-Match: *``; on disk a
  hard link, which fails if the name exists). If it exists and its holder renewed it within
  the TTL it recorded, refuse with one line naming the holder. If it is older than that TTL
  (its driver was killed, or is frozen or cut off), replace it with a compare-and-swap on the
  version read (S3 ``If-Match: <etag>``; on disk under ``flock``): of two drivers taking over
  at once, one wins. A holder that ran in this very process namespace (same boot id and PID
  namespace) and whose pid no longer exists is known dead at once: no need to wait for the TTL.
  (A reused pid only makes us wait for the TTL; other hosts and containers always wait.)
- **Heartbeat**: a daemon thread rewrites the lease every TTL/3 with the same compare-and-swap.
  Age is measured by the store's clock (S3 ``Date`` - ``Last-Modified``; file mtime), so client
  clocks need not agree. A failed swap means someone took the output over: the driver stops
  committing (``lost``), and its remaining shards become orphans the new holder deletes.
- **Release**: delete the lease if it is still ours.

The TTL comes from ``$HARVEST_LEASE_TTL_S`` (default 60 s). The commit protocol does not rely
on the lease for correctness on stores with conditional creates (a unit's commit object is
created once); the lease keeps two drivers from doing the same work and from deleting each
other's shards as orphans, and on stores without conditional requests it is what makes
create-once hold.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from workers.storage import StorageError, Store

LEASE = "_harvest/lease.json"
TTL_ENV = "HARVEST_LEASE_TTL_S"
DEFAULT_TTL_S = 60.0


class OutputBusy(RuntimeError):
    """Another driver holds the output; the message names it."""


class LeaseRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["lease"] = "lease"
    host: str
    pid: int
    run_id: str
    since: str
    ttl_s: float
    beat: int = 0
    pid_space: str = ""  # boot id + PID namespace: where ``pid`` means something


def pid_space() -> str:
    """This machine boot and PID namespace; empty where it cannot be told."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _known_dead(holder: LeaseRecord) -> bool:
    """The holder ran in our PID space and its process is gone (SIGKILL, crash)."""
    if not holder.pid_space or holder.pid_space != pid_space():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def ttl_from_env() -> float:
    value = os.environ.get(TTL_ENV)
    return float(value) if value else DEFAULT_TTL_S


class Lease:
    """The held lease; ``lost`` turns True if another driver took the output over."""

    def __init__(self, store: Store, record: LeaseRecord, token: str) -> None:
        self.store, self.record, self.token = store, record, token
        self.lost = False
        self._stop = threading.Event()
        self._renewed = time.monotonic()
        self._renewing = threading.Lock()  # the heartbeat and confirm() renew from one token
        self._thread = threading.Thread(target=self._beat, name="harvest-lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, store: Store, ttl_s: float | None = None) -> Lease:
        record = LeaseRecord(
            host=socket.gethostname(),
            pid=os.getpid(),
            run_id=uuid.uuid4().hex[:12],
            since=datetime.now(UTC).isoformat(timespec="seconds"),
            ttl_s=ttl_s if ttl_s is not None else ttl_from_env(),
            pid_space=pid_space(),
        )
        data = record.model_dump_json().encode()
        if store.create(LEASE, data):
            current = store.read_versioned(LEASE)
            if current is not None and current.data == data:
                return cls(store, record, current.token)
        current = store.read_versioned(LEASE)
        if current is None:  # released between our create and read: try once more
            if store.create(LEASE, data) and (now := store.read_versioned(LEASE)):
                return cls(store, record, now.token)
            raise OutputBusy(f"{store.uri} is being taken by another harvest driver; retry")
        holder = _parse(current.data)
        if holder is not None and current.age_s <= holder.ttl_s and not _known_dead(holder):
            raise OutputBusy(_busy(store, holder, current.age_s))
        token = store.replace(LEASE, data, current.token)
        if token is None:
            now = store.read_versioned(LEASE)
            holder = _parse(now.data) if now else None
            raise OutputBusy(
                _busy(store, holder, now.age_s) if holder and now else f"{store.uri} is busy"
            )
        return cls(store, record, token)

    def _beat(self) -> None:
        period = max(self.record.ttl_s / 3, 0.05)
        while not self._stop.wait(period):
            try:
                renewed = self._renew()
            except OSError:  # StorageError, or a temporary gone under a local write
                renewed = False  # the store hiccuped: try again next period, within the TTL
            if not renewed and (self.lost or time.monotonic() - self._renewed > self.record.ttl_s):
                self.lost = True
                return

    def confirm(self) -> bool:
        """Renew now; False if another driver holds the output (then delete nothing)."""
        return not self.lost and self._renew()

    def _renew(self) -> bool:
        """Rewrite the lease from the token we hold; sets ``lost`` if it is no longer ours.

        Serialised: the heartbeat thread and ``confirm()`` swapping from the same token at once
        would make one of them fail its swap and take itself for overtaken. A swap that reached
        the store but whose answer was lost (a client retry then fails its precondition) is
        told apart from a takeover by reading back what is there: our own record at this beat.
        """
        with self._renewing:
            if self.lost:
                return False
            beat = self.record.model_copy(update={"beat": self.record.beat + 1})
            data = beat.model_dump_json().encode()
            token = self.store.replace(LEASE, data, self.token)
            if token is None:
                now = self.store.read_versioned(LEASE)
                if now is None or now.data != data:
                    self.lost = True
                    return False
                token = now.token
            self.record, self.token, self._renewed = beat, token, time.monotonic()
            return True

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self._renewing:
            if self.lost:
                return
            try:
                if not self.store.delete_if(LEASE, self.token):
                    self._delete_if_ours()
            except StorageError:
                pass  # it expires after its TTL

    def _delete_if_ours(self) -> None:
        """The token went stale under us (a renewal whose answer was lost): delete the lease
        only if what is stored is still our record, under the token it has now."""
        now = self.store.read_versioned(LEASE)
        held = _parse(now.data) if now else None
        if now and held and held.run_id == self.record.run_id:
            self.store.delete_if(LEASE, now.token)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(data: bytes) -> LeaseRecord | None:
    try:
        return LeaseRecord.model_validate_json(data)
    except ValidationError:
        return None


def _busy(store: Store, holder: LeaseRecord, age_s: float) -> str:
    return (
        f"{store.uri} is in use by another harvest driver: pid {holder.pid} on {holder.host} "
        f"since {holder.since} (lease renewed {age_s:.0f}s ago; a lease not renewed for "
        f"{holder.ttl_s:g}s is taken over)"
    )
