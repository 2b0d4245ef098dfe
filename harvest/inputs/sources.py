"""Read prompts from JSONL or Parquet files and cut them into deterministic work units.

Problems with the input as a whole (no file, unreadable file, no rows, duplicate ids) raise
``InputError`` with a one-line message before any request is sent. Problems with one row
(malformed JSON, invalid UTF-8, wrong types, no prompt) become ``RowProblem`` values that the
worker records as failure rows: the job goes on, and nothing is dropped silently.

Row ids are the ``id`` column when present, else ``<file>:<line>`` (JSONL) or ``<file>#<row>``
(Parquet), with ``<file>`` relative to the input glob's folder, so reruns give the same ids.
Inputs may be local paths or ``s3://`` / ``gs://`` URIs, globs included; files are read through
``workers.storage`` and streamed, never copied to local disk.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from harvest.inputs.dupes import DuplicateFinder
from harvest.inputs.idrows import HARVEST_COLUMNS, carries_ids, dup_key, ids_row
from schemas.job import OVERRIDABLE, JobSpec
from schemas.wire import PromptRow, RowProblem, WorkUnit
from workers.storage import StorageError, Store, is_uri, open_store, split_location

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
ROLES = {"system", "user", "assistant", "tool", "developer"}
RAW_LIMIT = 10_000
WHOLE = 0xFFFFFFFF  # a row whose source does not start with its file's path: kept whole


class InputError(ValueError):
    """The input cannot be harvested at all; the message names the file."""


@dataclass(frozen=True)
class InputFile:
    path: str  # a local path or a URI
    name: str  # relative to the glob's base folder: used in ids and unit ids


@dataclass(frozen=True)
class InputScan:
    files: list[InputFile]
    rows: int
    problems: int
    fingerprint: str
    kinds: frozenset[str] = frozenset()  # "chat" / "completions": what the valid rows are


def resolve_files(pattern: str, format: str = "rows") -> list[InputFile]:
    """Expand a path or glob into sorted input files, each named relative to the glob's base;
    for ``format`` "harvest", the committed data shards of the harvest output at ``pattern``."""
    if format == "harvest":
        return _harvest_files(pattern)
    if is_uri(pattern):
        return _resolve_uri(pattern)
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
        files.append(InputFile(str(path), str(path.relative_to(base))))
    return files


def _harvest_files(out: str) -> list[InputFile]:
    """Another harvest's committed data shards, in unit order: what its manifest names, never
    a listing of ``data/`` (which can hold uncommitted attempts)."""
    from harvest.training.reader import data_files

    try:
        files = data_files(out)
    except (StorageError, OSError, ValueError) as err:
        raise InputError(f"input: {out!r} is not a readable harvest output ({err})") from None
    if not files:
        raise InputError(f"input: the harvest output {out!r} has no committed data shard")
    return [InputFile(f, f[len(out.rstrip("/")) :].lstrip("/") or f) for f in files]


def _resolve_uri(pattern: str) -> list[InputFile]:
    """The same for object storage: list below the glob's fixed prefix, match the rest."""
    try:
        if not glob.has_magic(pattern):
            store, name = split_location(pattern)
            store.check()
            found = [(pattern, name)] if store.exists(name) else []
        else:
            parts = pattern.split("/")
            fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
            store = open_store("/".join(parts[:fixed]))
            store.check()  # a missing bucket or a bad credential, said as such
            regex = _glob_regex("/".join(parts[fixed:]))
            found = [(store.child_uri(n), n) for n in store.list() if regex.fullmatch(n)]
    except StorageError as err:
        raise InputError(f"input: {err}") from None
    if not found:
        raise InputError(f"input: no file matches {pattern!r}")
    for uri, _ in found:
        if not uri.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
            raise InputError(f"{uri}: unsupported input type (use .jsonl or .parquet)")
    return [InputFile(uri, name) for uri, name in found]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Shell-glob semantics over '/'-separated names: ``*`` and ``?`` stay within one level,
    a ``**`` level matches any number of levels."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
            continue
        c = pattern[i]
        if c == "*":
            out.append(".*" if pattern.startswith("**", i) else "[^/]*")
            i += 2 if pattern.startswith("**", i) else 1
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


@cache
def _store_of(location: str) -> tuple[Store, str]:
    return split_location(location)


def _read_lines(f: InputFile) -> Iterator[bytes]:
    store, name = _store_of(f.path)
    return store.iter_lines(name)


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
    if spec.mode == "score" and carries_ids(obj):  # the ids are scored; text is kept if sound
        text = prompt if isinstance(prompt, str) else None
        ok = messages is not None and not _check_messages(messages, cols.messages_field)
        chat = [{"role": m["role"], "content": m["content"]} for m in messages] if ok else None
        return ids_row(obj, pid, source, raw, text, chat)
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
    if spec.mode == "score":
        return _score_row(obj, pid, source, spec, raw, prompt, messages)
    overrides = obj.get(cols.overrides_field)
    overrides = {} if overrides is None else overrides
    if isinstance(overrides, dict):  # Parquet structs give None for fields a row leaves unset
        overrides = {k: v for k, v in overrides.items() if v is not None}
    checked = _check_overrides(overrides, spec, cols.overrides_field)
    if isinstance(checked, str):
        return bad(checked)
    return PromptRow(pid, source, prompt=prompt, messages=messages, overrides=checked)


def _score_row(
    obj: dict[str, Any],
    pid: str,
    source: str,
    spec: JobSpec,
    raw: str,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
) -> PromptRow | RowProblem:
    """A row to score: a prompt with its response, or a conversation with an assistant turn.

    Sampling overrides are not read: nothing is sampled in score mode."""
    field = spec.input.response_field
    response = obj.get(field)
    if messages is not None:
        if response is not None:
            return RowProblem(
                pid, source, f"score mode: a chat row carries its responses as assistant turns, "
                f"not in '{field}'", raw,
            )  # fmt: skip
        if not any(m["role"] == "assistant" for m in messages):
            return RowProblem(
                pid, source, "score mode: the conversation has no assistant turn", raw
            )
        if messages[0]["role"] == "assistant":  # its prefix would be an empty conversation
            return RowProblem(
                pid, source, "score mode: the conversation starts with an assistant turn, "
                "so nothing precedes it for the chat template to render", raw,
            )  # fmt: skip
        return PromptRow(pid, source, messages=messages)
    if response is None:
        return RowProblem(pid, source, f"score mode: row has no '{field}' to score", raw)
    if not isinstance(response, str) or not response:
        return RowProblem(pid, source, f"score mode: '{field}' must be a non-empty string", raw)
    return PromptRow(pid, source, prompt=prompt, response=response)


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
    for line_no, line in enumerate(_read_lines(f), start=1):
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
        store, name = _store_of(f.path)
        reader = pq.ParquetFile(store.open_input_file(name))
        columns = None
        if spec.input.format == "harvest":  # the ids and what a record keeps, not the top-K
            columns = [c for c in HARVEST_COLUMNS if c in reader.schema_arrow.names]
        index = 0
        for batch in reader.iter_batches(batch_size=1024, columns=columns):
            for obj in batch.to_pylist():
                source = f"{f.path}#{index}"
                raw = orjson.dumps(obj, default=str).decode()[:RAW_LIMIT]
                yield _row(obj, f"{f.name}#{index}", source, spec, raw)
                index += 1
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{f.path}: cannot read Parquet ({err})") from None


def iter_rows(f: InputFile, spec: JobSpec) -> Iterator[PromptRow | RowProblem]:
    if f.path.endswith(PARQUET_SUFFIXES):
        return _parquet_rows(f, spec)
    return _jsonl_rows(f, spec)


def scan(spec: JobSpec) -> InputScan:
    """Read the whole input once: count rows, reject duplicate ids, fingerprint the content."""
    files = resolve_files(spec.input.path, spec.input.format)
    ids = DuplicateFinder()  # bounded memory: no per-prompt state kept for the whole input
    rows = problems = 0
    kinds: set[str] = set()
    digest = hashlib.sha256()
    for index, f in enumerate(files):
        try:
            content = hashlib.sha256()
            for chunk in _store_of(f.path)[0].iter_chunks(_store_of(f.path)[1]):
                content.update(chunk)
            digest.update(f.name.encode() + b"\0" + content.digest())
        except StorageError as err:
            raise InputError(f"input: {err}") from None
        except OSError as err:
            raise InputError(f"{f.path}: cannot read ({err.strerror or err})") from None
        for row in iter_rows(f, spec):
            rows += 1
            problems += isinstance(row, RowProblem)
            if isinstance(row, PromptRow):
                kinds.add(row.api)
            key = dup_key(row)
            if row.source.startswith(f.path):  # the file's path once, not once per row
                ids.add(key, index, row.source[len(f.path) :])
            else:
                ids.add(key, WHOLE, row.source)
    dups = ids.find(limit=5)
    if dups:

        def at(where: tuple[int, str]) -> str:
            return where[1] if where[0] == WHOLE else files[where[0]].path + where[1]

        named = "; ".join(f"{d.prompt_id!r} at {at(d.first)} and {at(d.again)}" for d in dups)
        raise InputError(f"input: duplicate ids: {named}")
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
