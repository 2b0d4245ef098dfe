"""Shared helpers of the input-source tests: a job spec over a pattern, JSONL writing, reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from jobs import model, spec

from harvest.inputs.sources import iter_rows, resolve_files
from schemas.job import JobSpec
from schemas.wire import PromptRow, RowProblem


def make_spec(pattern: str | Path, sampling: dict[str, Any] | None = None, **cols: Any) -> JobSpec:
    return spec(
        model("m", "http://h:8000"), {"path": str(pattern), **cols}, sampling=sampling or {}
    )


def write_jsonl(path: Path, *lines: Any) -> Path:
    """Each line: bytes as-is, str encoded, anything else JSON-encoded."""
    out = []
    for line in lines:
        if isinstance(line, bytes):
            out.append(line)
        elif isinstance(line, str):
            out.append(line.encode())
        else:
            out.append(orjson.dumps(line))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(x + b"\n" for x in out))
    return path


def read(path: Path, **cols: Any) -> list[PromptRow | RowProblem]:
    spec = make_spec(path, **cols)
    [f] = resolve_files(spec.input.path)
    return list(iter_rows(f, spec))


def one(path: Path, line: Any, **cols: Any) -> PromptRow | RowProblem:
    [row] = read(write_jsonl(path, line), **cols)
    return row


USER = {"role": "user", "content": "hi"}
