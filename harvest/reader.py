"""Read a harvest's output for training: only committed shards, as Arrow.

Training code can also point pyarrow / polars / ``datasets`` at ``OUT/data/*.parquet`` directly;
going through the manifest additionally skips shards of units that were never committed.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from harvest import manifest


def data_files(out_dir: str | Path, kind: str = "data") -> list[str]:
    """Committed shard paths of ``kind`` ("data" or "failed"), in unit order."""
    return [str(p) for p in manifest.load(Path(out_dir)).shard_paths(kind)]


def dataset(out_dir: str | Path, kind: str = "data") -> ds.Dataset:
    return ds.dataset(data_files(out_dir, kind), format="parquet")


def read_table(out_dir: str | Path, kind: str = "data") -> pa.Table:
    return dataset(out_dir, kind).to_table()
