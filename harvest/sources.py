"""Read prompts from JSONL or Parquet files and cut them into deterministic work units.

Problems with the input as a whole (no file, unreadable file, no rows, duplicate ids) raise
``InputError`` with a one-line message before any request is sent. Problems with one row
(malformed JSON, invalid UTF-8, wrong types, no prompt) become ``RowProblem`` values that the
worker records as failure rows: the job goes on, and nothing is dropped silently.

Row ids are the ``id`` column when present, else ``<file>:<line>`` (JSONL) or ``<file>#<row>``
(Parquet), with ``<file>`` relative to the input glob's folder, so reruns give the same ids.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from schemas.job import OVERRIDABLE, JobSpec
from schemas.wire import PromptRow, RowProblem, WorkUnit

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
ROLES = {"system", "user", "assistant", "tool", "developer"}
RAW_LIMIT = 10_000


class InputError(ValueError):
    """The input cannot be harvested at all; the message names the file."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # relative to the glob's base folder: used in ids and unit ids


@dataclass(frozen=True)
class InputScan:
    files: list[InputFile]
    rows: int
    problems: int
    fingerprint: str
    kinds: frozenset[str] = frozenset()  # "chat" / "completions": what the valid rows are


def resolve_files(pattern: str) -> list[InputFile]:
    """Expand a path or glob into sorted input files, each named relative to the glob's base."""
    if Path(pattern).is_file():  # a real file whose name happens to contain [ ] * ?
        matches = [Path(pattern)]
        base = Path(pattern).parent
    else:
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        base = Path(pattern).parent if not glob.has_magic(pattern) else _glob_base(pattern)
    if not matches:
        raise InputError(f"input: no file matches {pattern!r}")
    files = []
    for path in matches:
        if not path.name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
            raise InputError(f"{path}: unsupported input type (use .jsonl or .parquet)")
        files.append(InputFile(path, str(path.relative_to(base))))
    return files


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    base = [p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*base) if base else Path(".")


def _row(obj: Any, default_id: str, source: str, spec: JobSpec, raw: str) -> PromptRow | RowProblem:
    cols = spec.input
    if not isinstance(obj, dict):
        return RowProblem(
            default_id, source, f"expected a JSON object, got {type(obj).__name__}", raw
        )
    pid = obj.get(cols.id_field)
    if pid is None:
        pid = default_id
    elif isinstance(pid, bool) or not isinstance(pid, str | int):
        return RowProblem(default_id, source, f"'{cols.id_field}' must be a string or integer", raw)
    pid = str(pid)

    def bad(reason: str) -> RowProblem:
        return RowProblem(pid, source, reason, raw)

    prompt, messages = obj.get(cols.prompt_field), obj.get(cols.messages_field)
    if prompt is not None and messages is not None:
        return bad(f"row has both '{cols.prompt_field}' and '{cols.messages_field}'")
    if prompt is None and messages is None:
        return bad(f"row has neither '{cols.prompt_field}' nor '{cols.messages_field}'")
    if prompt is not None:
        if not isinstance(prompt, str):
            return bad(f"'{cols.prompt_field}' must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            return bad(f"'{cols.prompt_field}' is empty")
    else:
        problem = _check_messages(messages, cols.messages_field)
        if problem:
            return bad(problem)
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    overrides = obj.get(cols.overrides_field)
    overrides = {} if overrides is None else overrides
    if isinstance(overrides, dict):  # Parquet structs give None for fields a row leaves unset
        overrides = {k: v for k, v in overrides.items() if v is not None}
    checked = _check_overrides(overrides, spec, cols.overrides_field)
    if isinstance(checked, str):
        return bad(checked)
    return PromptRow(pid, source, prompt=prompt, messages=messages, overrides=checked)


def _check_messages(messages: Any, field: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{field}' must be a non-empty list of {{role, content}}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"'{field}[{i}]' needs a string 'content'"
        if not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            return f"'{field}[{i}].role' must be one of {sorted(ROLES)}"
    return None


def _check_overrides(overrides: Any, spec: JobSpec, field: str) -> dict[str, Any] | str:
    """The validated (type-converted) overrides, or why they are unusable."""
    if not isinstance(overrides, dict):
        return f"'{field}' must be an object"
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        return f"'{field}' has keys that cannot be overridden per row: {sorted(unknown)}"
    try:
        merged = spec.sampling.model_validate({**spec.sampling.model_dump(), **overrides})
    except ValidationError as err:
        e = err.errors()[0]
        return f"'{field}.{'.'.join(map(str, e['loc']))}': {e['msg']}"
    return {k: getattr(merged, k) for k in overrides}


def _jsonl_rows(f: InputFile, spec: JobSpec) -> Iterator[PromptRow | RowProblem]:
    with open(f.path, "rb") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # blank lines are not rows
            source = f"{f.path}:{line_no}"
            default_id = f"{f.name}:{line_no}"
            if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark is not part of the first row
            raw = line[:RAW_LIMIT].decode("utf-8", errors="replace").rstrip("\n")
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as err:
                yield RowProblem(default_id, source, f"malformed JSON line: {err}", raw)
                continue
            yield _row(obj, default_id, source, spec, raw)


def _parquet_rows(f: InputFile, spec: JobSpec) -> Iterator[PromptRow | RowProblem]:
    try:
        reader = pq.ParquetFile(f.path)
        index = 0
        for batch in reader.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                source = f"{f.path}#{index}"
                raw = orjson.dumps(obj, default=str).decode()[:RAW_LIMIT]
                yield _row(obj, f"{f.name}#{index}", source, spec, raw)
                index += 1
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{f.path}: cannot read Parquet ({err})") from None


def iter_rows(f: InputFile, spec: JobSpec) -> Iterator[PromptRow | RowProblem]:
    if f.path.name.endswith(PARQUET_SUFFIXES):
        return _parquet_rows(f, spec)
    return _jsonl_rows(f, spec)


def scan(spec: JobSpec) -> InputScan:
    """Read the whole input once: count rows, reject duplicate ids, fingerprint the content."""
    files = resolve_files(spec.input.path)
    seen: dict[str, str] = {}
    dups: list[str] = []
    rows = problems = 0
    kinds: set[str] = set()
    digest = hashlib.sha256()
    for f in files:
        try:
            with open(f.path, "rb") as fh:
                digest.update(f.name.encode() + b"\0" + hashlib.file_digest(fh, "sha256").digest())
        except OSError as err:
            raise InputError(f"{f.path}: cannot read ({err.strerror})") from None
        for row in iter_rows(f, spec):
            rows += 1
            problems += isinstance(row, RowProblem)
            if isinstance(row, PromptRow):
                kinds.add(row.api)
            first = seen.setdefault(row.prompt_id, row.source)
            if first != row.source and len(dups) < 5:
                dups.append(f"{row.prompt_id!r} at {first} and {row.source}")
    if dups:
        raise InputError(f"input: duplicate ids: {'; '.join(dups)}")
    if rows == 0:
        raise InputError(f"input: no rows in {spec.input.path!r}")
    return InputScan(files, rows, problems, digest.hexdigest()[:16], frozenset(kinds))


def _slug(name: str) -> str:
    short = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', name)[-40:].strip('_')}-{short}"


def iter_units(files: list[InputFile], spec: JobSpec, prompts_per_unit: int) -> Iterator[WorkUnit]:
    """Deterministic units: consecutive rows of one file; the same input gives the same units."""
    for f in files:
        slug, chunk, k = _slug(f.name), [], 0
        for row in iter_rows(f, spec):
            chunk.append(row)
            if len(chunk) == prompts_per_unit:
                yield WorkUnit(f"{slug}-{k:06d}", chunk)
                chunk, k = [], k + 1
        if chunk:
            yield WorkUnit(f"{slug}-{k:06d}", chunk)
