"""Build Arrow tables from harvested records and write them as atomic Parquet shards.

A shard is written to a hidden temporary name in its final folder, flushed, then renamed over the
final name: a reader (or a resumed run) sees a whole file or no file, never a partial one.
Shard names derive from the unit id, so re-running a unit overwrites rather than duplicates.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.records import FAILURE_SCHEMA, METADATA_KEY, record_schema

TMP_PREFIX = ".tmp-"


class Columns:
    """Column-wise accumulator for one shard: append rows, then ``table()`` once."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.data: dict[str, list[Any]] = {name: [] for name in schema.names}

    def append(self, **values: Any) -> None:
        for name, col in self.data.items():
            col.append(values.get(name))

    def __len__(self) -> int:
        return len(self.data[self.schema.names[0]])

    def table(self) -> pa.Table:
        """The accumulated rows; a null in a non-nullable column is a bug, not a record.

        pyarrow would write such a null as an empty list without a word; refuse it instead."""
        table = pa.Table.from_pydict(self.data, schema=self.schema)
        for f in self.schema:
            if not f.nullable and table.column(f.name).null_count:
                raise ValueError(f"shard column {f.name!r} is not nullable but holds nulls")
        return table


def data_columns(k: int) -> Columns:
    return Columns(record_schema(k))


def failure_columns() -> Columns:
    return Columns(FAILURE_SCHEMA)


def write_shard(
    table: pa.Table, path: Path, metadata: dict[str, Any], compression: str = "zstd"
) -> str:
    """Write ``table`` atomically to ``path`` with our key-value metadata; return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    metadata = {**metadata, "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    meta[METADATA_KEY] = orjson.dumps(metadata, option=orjson.OPT_SORT_KEYS)
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp, compression=None if compression == "none" else compression)
        with open(tmp, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power loss
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (POSIX); where folders cannot be opened, there is nothing to do."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Our key-value metadata of one shard (the resolved spec, teacher, schema version...)."""
    meta = pq.read_schema(path).metadata or {}
    return orjson.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
