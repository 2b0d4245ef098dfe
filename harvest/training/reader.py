"""Read harvest outputs for training: only committed shards, one teacher at a time.

Outputs are local folders or ``s3://`` / ``gs://`` URIs (credentials from the environment).
Always go through the reader (or its ``data_files`` list): an output's ``data/`` folder can hold
shards of attempts that were never committed until the next run deletes them. The reader also
refuses to mix outputs of different teachers or tokenizers (token ids would not mean the same
thing) unless ``allow_mixed=True``.

Shards written with ``output.topk_encoding: compact`` hold one ``top_k_compact`` column where
others hold ``top_token_ids`` / ``top_logprobs``: ``read_table`` and everything built on this
module (batches, targets, the torch dataset, ``harvest inspect``) hand back the decoded columns;
on a raw ``dataset()`` pass each batch through ``decode_batch``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from harvest.outputs import manifest
from harvest.outputs.provenance import teacher_identity
from workers.shards.columns import read_metadata
from workers.shards.topk_codec import decode_batch, scan_columns
from workers.storage import Store, open_store


class MixedTeachersError(ValueError):
    """The shards come from different teachers, tokenizers or schema versions."""


Outputs = str | Path | list[str | Path]


def _stores(out_dirs: Outputs) -> list[Store]:
    return [open_store(str(d)) for d in (out_dirs if isinstance(out_dirs, list) else [out_dirs])]


def _committed(store: Store, kind: str) -> list[str]:
    return manifest.load(store).shard_paths(kind)


def data_files(out_dirs: Outputs, kind: str = "data") -> list[str]:
    """Committed shards of ``kind`` ("data" or "failed"), in unit order: local paths for a
    folder, full URIs (``s3://...``) for object storage."""
    return [s.child_uri(p) for s in _stores(out_dirs) for p in _committed(s, kind)]


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


def dataset(out_dirs: Outputs, kind: str = "data", *, allow_mixed: bool = False) -> ds.Dataset:
    """A pyarrow Dataset of the committed shards, on each output's own filesystem."""
    stores = _stores(out_dirs)
    parts = [(s, _committed(s, kind)) for s in stores]
    if not allow_mixed:
        check_same_teacher([s.child_uri(p) for s, paths in parts for p in paths])
    datasets = [
        ds.dataset([s.path(p) for p in paths], filesystem=s.fs, format="parquet")
        for s, paths in parts
    ]
    return datasets[0] if len(datasets) == 1 else ds.dataset(datasets)


def read_table(
    out_dirs: Outputs,
    kind: str = "data",
    *,
    allow_mixed: bool = False,
    columns: list[str] | None = None,
) -> pa.Table:
    """The committed shards as one table, any compact top-K decoded to top_token_ids /
    top_logprobs (``columns`` names decoded columns)."""
    data = dataset(out_dirs, kind, allow_mixed=allow_mixed)
    stored = None if columns is None else scan_columns(data.schema, columns)
    table = decode_batch(data.to_table(columns=stored))
    return (
        table if columns is None else table.select([c for c in columns if c in table.schema.names])
    )


__all__ = ["MixedTeachersError", "data_files", "dataset", "decode_batch", "read_table"]
