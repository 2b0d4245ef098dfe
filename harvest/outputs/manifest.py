"""The commit protocol: which shards are part of an output. One code path for every store.

Layout under the output root (a folder, ``s3://`` or ``gs://`` prefix)::

    _harvest/job.json              JobHeader: the job id, fingerprints, the resolved spec
    _harvest/teacher.json          TeacherRecord: the teacher identity seen at the first run
    _harvest/commits/<unit>.json   UnitCommit (or RetryCommit for "<unit>.retry<k>")
    _harvest/lease.json            the running driver's lease (``harvest.driver.lease``)
    data/part-<unit>-<attempt>.parquet, failed/part-<unit>-<attempt>.parquet

Workers write each shard once, under a name unique to its attempt; nothing is renamed or
appended (object stores can do neither). A shard becomes part of the output only when the
driver creates its unit's commit object, once, with a conditional create. The commits are the
only source of truth for resume, readers and tools: a shard no commit names (a crashed or
duplicate attempt, a superseded failure shard, a torn local write) is never read, and the next
``harvest run`` or ``retry-failed`` deletes it. Commits name their job, so after ``--force-new``
a stale commit of the old job is ignored (and deleted) even if it outlived the reset.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from schemas.job import JobSpec
from schemas.wire import UnitResult
from workers.storage import Store, open_store

META = "_harvest"
HEADER = f"{META}/job.json"
TEACHER = f"{META}/teacher.json"
COMMITS = f"{META}/commits"
SHARD_DIRS = ("data", "failed")
RETRY_SEP = ".retry"  # unit id of the k-th retry of unit U: f"U{RETRY_SEP}{k}"


class ResumeRefused(ValueError):
    """The output holds a different job; the message says what changed."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def dumps(self) -> bytes:
        return self.model_dump_json().encode()


class JobHeader(_Record):
    kind: Literal["job"] = "job"
    job_id: str
    spec_fingerprint: str
    input_fingerprint: str
    teacher: str
    spec: dict[str, Any]  # holds no secrets: keys live in the environment
    created: float


class TeacherRecord(_Record):
    kind: Literal["teacher"] = "teacher"
    job_id: str
    identity: dict[str, Any]


class UnitCommit(_Record, UnitResult):
    """A unit's first harvest: the worker's ``UnitResult`` (shard paths relative to the output
    root, counts) and the job it belongs to."""

    kind: Literal["unit"] = "unit"
    job_id: str

    @classmethod
    def of(cls, job_id: str, result: UnitResult, **extra: Any) -> UnitCommit:
        return cls(job_id=job_id, **result.model_dump(), **extra)


class RetryCommit(UnitCommit):
    """A retry of a unit's failed prompts: its data joins the unit's; its failure shard (or
    none) replaces the unit's current one."""

    kind: Literal["retry"] = "retry"  # type: ignore[assignment]
    of_unit: str
    attempt: int


Record = Annotated[
    JobHeader | TeacherRecord | UnitCommit | RetryCommit, Field(discriminator="kind")
]
_RECORD = TypeAdapter(Record)


def parse_record(data: bytes) -> JobHeader | TeacherRecord | UnitCommit | RetryCommit:
    """The one way a manifest object is read."""
    return _RECORD.validate_json(data)


@dataclass
class UnitState:
    """A committed unit as readers see it: its first commit and its retries, in order."""

    base: UnitCommit
    retries: list[RetryCommit] = field(default_factory=list)

    @property
    def data_paths(self) -> list[str]:
        return [c.data_path for c in (self.base, *self.retries) if c.data_path]

    @property
    def last(self) -> UnitCommit:
        return self.retries[-1] if self.retries else self.base

    @property
    def failed_path(self) -> str | None:
        return self.last.failed_path

    @property
    def data_rows(self) -> int:
        return sum(c.data_rows for c in (self.base, *self.retries))

    @property
    def failure_rows(self) -> int:
        return self.last.failure_rows

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in (self.base, *self.retries))


class Manifest:
    def __init__(self, store: Store, header: JobHeader, commits: list[UnitCommit]) -> None:
        self.store = store
        self.header = header
        self.teacher: TeacherRecord | None = None
        self.units: dict[str, UnitState] = {}
        for c in sorted(commits, key=lambda c: (isinstance(c, RetryCommit), _attempt(c))):
            if isinstance(c, RetryCommit):
                if c.of_unit in self.units:
                    self.units[c.of_unit].retries.append(c)
            else:
                self.units[c.unit_id] = UnitState(c)

    @property
    def job_id(self) -> str:
        return self.header.job_id

    @classmethod
    def open(
        cls, store: Store, *, spec: JobSpec, input_fp: str, force_new: bool = False
    ) -> Manifest:
        """Resume the job in ``store`` if it is the same job, or start a new one there.

        The caller holds the output's lease: no other driver writes here meanwhile."""
        header = _read_header(store)
        if header is not None and force_new:
            store.delete(TEACHER)
            store.delete(HEADER)  # from here on the old job's commits name a job that is gone
            header = None
        if header is not None:
            changed = [
                what
                for what, was, now in (
                    ("the input files' content", header.input_fingerprint, input_fp),
                    ("the teacher or sampling spec", header.spec_fingerprint, spec.fingerprint()),
                )
                if was != now
            ]
            if changed:
                fields = changed_fields(header.spec, spec.model_dump(mode="json"))
                named = f" ({', '.join(fields)})" if fields and len(changed) == 1 else ""
                if fields and len(changed) == 2:
                    named = f" (spec: {', '.join(fields)})"
                raise ResumeRefused(
                    f"{store.uri} holds job {header.job_id} and {' and '.join(changed)} "
                    f"changed since{named}; use another --output, or --force-new to discard it"
                )
        else:
            header = JobHeader(
                job_id=uuid.uuid4().hex[:12],
                spec_fingerprint=spec.fingerprint(),
                input_fingerprint=input_fp,
                teacher=spec.teacher.model,
                spec=spec.model_dump(mode="json"),
                created=time.time(),
            )
            if not store.create(HEADER, header.dumps()):
                raise ResumeRefused(f"{store.uri}: another driver started a job here meanwhile")
        manifest = cls(store, header, _read_commits(store, header.job_id))
        manifest.teacher = _read_teacher(store, header.job_id)
        manifest.sweep()
        return manifest

    def check_teacher(self, identity: dict[str, Any]) -> None:
        """Refuse to continue a job whose teacher (model, weights path, tokenizer) changed."""
        if self.teacher is not None and self.teacher.identity != identity:
            recorded = self.teacher.identity
            changed = sorted(k for k in identity if recorded.get(k) != identity[k])
            raise ResumeRefused(
                f"{self.store.uri} was harvested from a different teacher ({', '.join(changed)} "
                "changed); use another --output, or --force-new to discard it"
            )
        if self.teacher is None:
            record = TeacherRecord(job_id=self.job_id, identity=identity)
            self.store.delete(TEACHER)  # at most a stale one of a job reset by --force-new
            self.store.create(TEACHER, record.dumps())
            self.teacher = record

    def commit(self, result: UnitResult) -> UnitCommit | None:
        """Create the unit's commit object; None if the unit was already committed (then this
        attempt's shards are orphans, deleted here)."""
        record = UnitCommit.of(self.job_id, result)
        if not self._create(record):
            return None
        self.units[record.unit_id] = UnitState(record)
        return record

    def retries(self, unit_id: str) -> int:
        return len(self.units[unit_id].retries)

    def commit_retry(self, result: UnitResult) -> RetryCommit | None:
        """Record a retry of a unit's failed prompts; the superseded failure shard is deleted
        once the commit exists."""
        unit_id, _, attempt = result.unit_id.partition(RETRY_SEP)
        state = self.units[unit_id]
        before = state.failed_path
        record = RetryCommit.of(self.job_id, result, of_unit=unit_id, attempt=int(attempt))
        if not self._create(record):
            return None
        state.retries.append(record)
        if before and before != record.failed_path:
            self.store.delete(before)
        return record

    def _create(self, record: UnitCommit) -> bool:
        if self.store.create(_commit_name(record.unit_id), record.dumps()):
            return True
        for path in (record.data_path, record.failed_path):
            if path:
                self.store.delete(path)
        return False

    def shard_paths(self, kind: str = "data") -> list[str]:
        """Committed shards of ``kind``, relative to the output root, sorted."""
        if kind == "data":
            return sorted(p for u in self.units.values() for p in u.data_paths)
        return sorted(u.failed_path for u in self.units.values() if u.failed_path)

    def sweep(self) -> list[str]:
        """Delete what no commit of this job names: orphan shards, foreign commits, temporaries.

        Run by the lease holder only, at the start and end of a run."""
        keep = set(self.shard_paths("data")) | set(self.shard_paths("failed"))
        keep |= {_commit_name(uid) for u in self.units.values() for uid in _ids(u)}
        gone = []
        for sub in (*SHARD_DIRS, COMMITS):
            for name in self.store.list(sub):
                if name not in keep:
                    self.store.delete(name)
                    gone.append(name)
        # Not this driver's own writes under way: the lease's heartbeat runs beside the sweep.
        self.store.delete_dead_temporaries(META)
        return gone


# The spec fields the job fingerprint hashes (JobSpec.fingerprint): a change to one of them
# refuses a resume, and the refusal names it.
FINGERPRINTED = ("mode", "teacher.model", "sampling.", "input.", "output.rows_per_shard",
                 "output.logprob_dtype")  # fmt: skip


def _flat(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_fields(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``field (old -> new)`` for each fingerprinted spec field that differs."""
    old, new = _flat(was), _flat(now)
    return [
        f"{k} ({old.get(k)} -> {new.get(k)})"
        for k in sorted(old.keys() | new.keys())
        if k.startswith(FINGERPRINTED) and k != "input.path" and old.get(k) != new.get(k)
    ]


def _ids(state: UnitState) -> list[str]:
    return [state.base.unit_id, *(r.unit_id for r in state.retries)]


def _attempt(commit: UnitCommit) -> int:
    return commit.attempt if isinstance(commit, RetryCommit) else 0


def _commit_name(unit_id: str) -> str:
    return f"{COMMITS}/{unit_id}.json"


def _read_header(store: Store) -> JobHeader | None:
    if not store.exists(HEADER):
        return None
    try:
        record = parse_record(store.read_bytes(HEADER))
    except ValidationError:
        record = None
    if not isinstance(record, JobHeader):
        raise ResumeRefused(f"{store.child_uri(HEADER)}: not a teacher-harvest job header")
    return record


def _read_teacher(store: Store, job_id: str) -> TeacherRecord | None:
    if not store.exists(TEACHER):
        return None
    record = parse_record(store.read_bytes(TEACHER))
    return record if isinstance(record, TeacherRecord) and record.job_id == job_id else None


def _read_commits(store: Store, job_id: str) -> list[UnitCommit]:
    """Every readable commit of ``job_id`` (read concurrently: one small GET each)."""

    def one(name: str) -> UnitCommit | None:
        try:
            record = parse_record(store.read_bytes(name))
        except (ValidationError, FileNotFoundError):
            return None
        return record if isinstance(record, UnitCommit) and record.job_id == job_id else None

    names = [n for n in store.list(COMMITS) if n.endswith(".json")]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return [c for c in pool.map(one, names) if c is not None]


def load(location: str | Store) -> Manifest:
    """Read an existing output's manifest (for readers and tools; takes no lease, deletes
    nothing)."""
    store = location if isinstance(location, Store) else open_store(str(location))
    header = _read_header(store)
    if header is None:
        raise FileNotFoundError(f"{store.uri}: no {HEADER}; is this a harvest output?")
    manifest = Manifest(store, header, _read_commits(store, header.job_id))
    manifest.teacher = _read_teacher(store, header.job_id)
    return manifest
