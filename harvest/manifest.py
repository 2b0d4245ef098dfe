"""The output folder's manifest: the one record of which units are committed.

``_manifest.jsonl`` is appended to by the driver alone: a header line naming the job, then one
line per committed unit (its shards, row counts and checksums). A shard on disk that the manifest
does not list is not committed; its unit runs again and overwrites it (shard names derive from
unit ids), so a rerun never duplicates rows. A torn last line (driver killed mid-write) is
ignored for the same reason.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from schemas.job import JobSpec
from schemas.wire import UnitResult
from workers.writer import TMP_PREFIX

MANIFEST = "_manifest.jsonl"
RETRY_SEP = ".retry"  # unit id of the k-th retry of unit U: f"U{RETRY_SEP}{k}"


class ResumeRefused(ValueError):
    """The output folder holds a different job; the message says what changed."""


class Manifest:
    def __init__(self, out_dir: Path, header: dict[str, Any], units: dict[str, dict[str, Any]]):
        self.out_dir = out_dir
        self.header = header
        self.units = units

    @property
    def job_id(self) -> str:
        return self.header["job_id"]

    @classmethod
    def open(
        cls, out_dir: Path, *, spec: JobSpec, input_fp: str, force_new: bool = False
    ) -> Manifest:
        """Resume the job in ``out_dir`` if it is the same job, or start a new one there."""
        path = out_dir / MANIFEST
        if path.exists() and force_new:
            for sub in ("data", "failed"):
                shutil.rmtree(out_dir / sub, ignore_errors=True)
            path.unlink()
        if path.exists():
            _drop_torn_tail(path)
            header, units = _read(path)
            changed = [
                what
                for what, key, now in (
                    ("the input files' content", "input_fingerprint", input_fp),
                    ("the teacher or sampling spec", "spec_fingerprint", spec.fingerprint()),
                )
                if header.get(key) != now
            ]
            if changed:
                raise ResumeRefused(
                    f"{out_dir} holds job {header.get('job_id')} and {' and '.join(changed)} "
                    "changed since; use another --output, or --force-new to discard it"
                )
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            header = {
                "kind": "job",
                "job_id": uuid.uuid4().hex[:12],
                "spec_fingerprint": spec.fingerprint(),
                "input_fingerprint": input_fp,
                "teacher": spec.teacher.model,
                "spec": spec.model_dump(mode="json"),  # holds no secrets: keys live in the env
                "created": time.time(),
            }
            _append(path, header)
            units = {}
        _clean_temporaries(out_dir)
        return cls(out_dir, header, units)

    def check_teacher(self, identity: dict[str, Any]) -> None:
        """Refuse to continue a job whose teacher (model, weights path, tokenizer) changed."""
        recorded = self.header.get("teacher_identity")
        if recorded is not None and recorded != identity:
            changed = sorted(k for k in identity if recorded.get(k) != identity[k])
            raise ResumeRefused(
                f"{self.out_dir} was harvested from a different teacher ({', '.join(changed)} "
                "changed); use another --output, or --force-new to discard it"
            )
        if recorded is None:
            self.header = {**self.header, "teacher_identity": identity}
            _append(self.out_dir / MANIFEST, self.header)

    def _relative(self, record: dict[str, Any]) -> dict[str, Any]:
        for key in ("data_path", "failed_path"):
            if record[key]:
                record[key] = os.path.relpath(record[key], self.out_dir)
        return record

    def commit(self, result: UnitResult) -> None:
        record = self._relative({"kind": "unit", **asdict(result)})
        _append(self.out_dir / MANIFEST, record)
        self.units[result.unit_id] = record

    def retries(self, unit_id: str) -> int:
        return len(self.units[unit_id].get("retry_data_paths", []))

    def commit_retry(self, result: UnitResult) -> None:
        """Record a retry of a unit's failed prompts: its data shard joins the unit's, and its
        failure shard replaces the unit's (the old one is deleted once this line is on disk)."""
        unit_id = result.unit_id.split(RETRY_SEP)[0]
        before = self.units[unit_id]
        new = self._relative(asdict(result))
        record = {
            **before,
            "retry_data_paths": [*before.get("retry_data_paths", []), new["data_path"]],
            "failed_path": new["failed_path"],
            "failed_sha256": new["failed_sha256"],
            "retry_sha256s": [*before.get("retry_sha256s", []), new["data_sha256"]],
            "data_rows": before["data_rows"] + result.data_rows,
            "failure_rows": result.failure_rows,
            "completion_tokens": before["completion_tokens"] + result.completion_tokens,
        }
        _append(self.out_dir / MANIFEST, record)
        self.units[unit_id] = record
        if before.get("failed_path") and before["failed_path"] != record["failed_path"]:
            (self.out_dir / before["failed_path"]).unlink(missing_ok=True)

    def shard_paths(self, kind: str = "data") -> list[Path]:
        paths = []
        for u in self.units.values():
            if u.get(f"{kind}_path"):
                paths.append(u[f"{kind}_path"])
            if kind == "data":
                paths.extend(u.get("retry_data_paths", []))
        return sorted(self.out_dir / p for p in paths)


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "ab") as fh:
        fh.write(orjson.dumps(record) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line the driver did not finish writing, so the next append starts clean."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    header: dict[str, Any] = {}
    units: dict[str, dict[str, Any]] = {}
    for line in path.read_bytes().splitlines():
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # torn last write: that unit is simply not committed
        if rec.get("kind") == "job":
            header = rec
        elif rec.get("kind") == "unit":
            units[rec["unit_id"]] = rec
    if not header:
        raise ResumeRefused(f"{path}: not a teacher-harvest manifest")
    return header, units


def load(out_dir: Path) -> Manifest:
    """Read an existing output folder's manifest (for readers and tools)."""
    path = out_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{out_dir}: no {MANIFEST}; is this a harvest output folder?")
    header, units = _read(path)
    return Manifest(out_dir, header, units)


def _clean_temporaries(out_dir: Path) -> None:
    for sub in ("data", "failed"):
        for tmp in (out_dir / sub).glob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
