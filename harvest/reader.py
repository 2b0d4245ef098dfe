"""Read harvest outputs for training: only committed shards, one teacher at a time.

Training code can also point pyarrow / polars / ``datasets`` at ``OUT/data/*.parquet`` directly;
going through the reader additionally skips shards of units that were never committed, and
refuses to mix outputs of different teachers or tokenizers (token ids would not mean the same
thing) unless ``allow_mixed=True``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from harvest import manifest
from harvest.provenance import teacher_identity
from workers.writer import read_metadata


class MixedTeachersError(ValueError):
    """The shards come from different teachers, tokenizers or schema versions."""


def data_files(out_dirs: str | Path | list[str | Path], kind: str = "data") -> list[str]:
    """Committed shard paths of ``kind`` ("data" or "failed"), in unit order."""
    dirs = out_dirs if isinstance(out_dirs, list) else [out_dirs]
    return [str(p) for d in dirs for p in manifest.load(Path(d)).shard_paths(kind)]


def check_same_teacher(files: list[str]) -> None:
    seen: dict[str, str] = {}
    for path in files:
        identity = repr(teacher_identity(read_metadata(path)))
        seen.setdefault(identity, path)
    if len(seen) > 1:
        a, b = list(seen.values())[:2]
        raise MixedTeachersError(
            f"{a} and {b} come from different teachers or tokenizers; pass allow_mixed=True "
            "only if your training code handles that"
        )


def dataset(
    out_dirs: str | Path | list[str | Path], kind: str = "data", *, allow_mixed: bool = False
) -> ds.Dataset:
    files = data_files(out_dirs, kind)
    if not allow_mixed:
        check_same_teacher(files)
    return ds.dataset(files, format="parquet")


def read_table(
    out_dirs: str | Path | list[str | Path], kind: str = "data", *, allow_mixed: bool = False
) -> pa.Table:
    return dataset(out_dirs, kind, allow_mixed=allow_mixed).to_table()
