"""Build Arrow tables from harvested records and write them as Parquet shards on any store.

Each attempt at a unit writes its shards under names of its own (``part-<unit>-<attempt>``),
in one whole-object write; whether a shard is part of the output is decided by the driver's
commit alone, so a partial or duplicate attempt is never read (see ``harvest.outputs.manifest``).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.records import FAILURE_SCHEMA, METADATA_KEY, TOPK_COMPACT_COLUMN, record_schema
from schemas.wire import Sample
from workers.shards import topk_codec
from workers.storage import Store, split_location

# Footer key of the top-K encoding and, for a lossy one, its error on this shard: known only
# once every row is encoded, so written at close, beside METADATA_KEY (``read_metadata`` merges).
TOPK_KEY = b"teacher_harvest.topk_encoding"
TOP_K_INPUTS = ("top_token_ids", "top_logprobs")  # what a compact column is built from


class Columns:
    """Column-wise accumulator for one shard: append rows, then ``table()`` once."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.data: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.compact = TOPK_COMPACT_COLUMN in schema.names
        if self.compact:  # rows bring the top-K as usual; table() encodes them
            self.data.update({name: [] for name in TOP_K_INPUTS})
        self.error = topk_codec.CodecError()  # what table() cost (compact encoding only)

    def append(self, **values: Any) -> None:
        for name, col in self.data.items():
            col.append(values.get(name))

    def __len__(self) -> int:
        return len(self.data[self.schema.names[0]])

    def table(self) -> pa.Table:
        """The accumulated rows; a null in a non-nullable column is a bug, not a record.

        pyarrow would write such a null as an empty list without a word; refuse it instead."""
        arrays = [
            self._compact() if f.name == TOPK_COMPACT_COLUMN else _array(self.data[f.name], f.type)
            for f in self.schema
        ]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        for f in self.schema:
            if not f.nullable and table.column(f.name).null_count:
                raise ValueError(f"shard column {f.name!r} is not nullable but holds nulls")
        return table

    def _compact(self) -> pa.Array:
        k = int(self.schema.field(TOPK_COMPACT_COLUMN).metadata[b"k"])
        blobs = []
        for ids, lps in zip(*(self.data[name] for name in TOP_K_INPUTS), strict=True):
            if ids is None or lps is None:
                blobs.append(None)  # refused below, as any null in a non-nullable column
                continue
            ids = np.asarray(ids, np.int64).reshape(-1, k)
            blob, err = topk_codec.encode(ids, np.asarray(lps, np.float64).reshape(-1, k))
            self.error.add(err)
            blobs.append(blob)
        return pa.array(blobs, pa.binary())


def topk_entry(schema: pa.Schema, error: topk_codec.CodecError) -> dict[bytes, bytes]:
    """The footer entry naming a data shard's top-K encoding (and a lossy one's error); none
    for other shards."""
    if TOPK_COMPACT_COLUMN in schema.names:
        entry: dict[str, Any] = error.summary()
    elif "top_logprobs" in schema.names:
        lp = schema.field("top_logprobs").type.value_type.value_type
        entry = {
            "name": "float16" if lp == pa.float16() else "float32",
            "lossless": lp == pa.float32(),
        }
    else:
        return {}
    return {TOPK_KEY: orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)}


def compact(sample: Sample) -> Sample:
    """The same sample with its per-token lists as numpy arrays (ids int64, logprobs float64).

    A parsed 256-token top-20 answer is ~10,000 Python numbers (~350 KB); a unit holds every
    answer until its shard is written, so at the default 2,000 rows per shard the lists alone
    would be ~700 MB per worker. The arrays hold the same values in ~80 KB, and the writer
    turns them into Arrow columns with one cast each (the same rounding as from the lists)."""
    n = len(sample.token_ids)
    return replace(  # other fields (and any added later) pass through as they are
        sample,
        token_ids=np.asarray(sample.token_ids, np.int64),
        logprobs=np.asarray(sample.logprobs, np.float64),
        top_token_ids=_rows(sample.top_token_ids, np.int64, n),
        top_logprobs=_rows(sample.top_logprobs, np.float64, n),
    )


def _rows(values: Any, dtype: type, n: int) -> np.ndarray:
    """``n`` rows of K values as an (n, K) array, also for n = 0 or K = 0."""
    a = np.asarray(values, dtype)
    return a.reshape(n, a.size // n if n else 0)


def _array(values: list[Any], type_: pa.DataType) -> pa.Array:
    """One column. A list column whose rows are all numpy arrays (``compact``) is built from
    one concatenated buffer and offsets (``FixedSizeListArray.from_arrays`` for top-K);
    anything else goes through ``pa.array``, arrays as lists (same values either way)."""
    arrays = pa.types.is_list(type_) and values and all(type(v) is np.ndarray for v in values)
    if not arrays:
        if any(type(v) is np.ndarray for v in values):
            values = [v.tolist() if type(v) is np.ndarray else v for v in values]
        return pa.array(values, type_)
    inner = type_.value_type
    lengths = np.fromiter((len(v) for v in values), np.int64, len(values))
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"one shard column holds {offsets[-1]} entries; lower rows_per_shard")
    flat = np.concatenate([v.reshape(-1) for v in values])
    if pa.types.is_fixed_size_list(inner):
        k = inner.list_size
        if not k or not len(flat):  # nothing to lay out, and no length to infer it from
            return pa.array([v.tolist() for v in values], type_)
        if any(len(v) and (v.ndim != 2 or v.shape[1] != k) for v in values):
            raise ValueError(f"a {type_} row is not exactly {k} wide")
        child: pa.Array = pa.FixedSizeListArray.from_arrays(
            pa.array(flat).cast(inner.value_type), k
        )
    else:
        child = pa.array(flat).cast(inner)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), child, type=type_)


def warm_up() -> None:
    """Do pyarrow's one-time work before requests flow. Its first conversion of a Python list
    imports pandas (~0.25 CPU-s, holding the GIL): left to the first row group, that lands in
    the middle of a unit and stalls the event loop that keeps the teacher busy."""
    pa.array(["warm"], pa.string())


def data_columns(k: int, logprob_dtype: str = "float32", topk_encoding: str = "float32") -> Columns:
    return Columns(record_schema(k, logprob_dtype, topk_encoding))


def failure_columns() -> Columns:
    return Columns(FAILURE_SCHEMA)


def parquet_options(schema: pa.Schema, compression: str = "zstd") -> dict[str, Any]:
    """How every shard is encoded (``pq.ParquetWriter`` keywords), in one place.

    Per-token lists of numbers skip dictionary encoding (a dictionary of nearly all-distinct
    floats and ids costs CPU and saves nothing) and their floats are byte-stream-split (zstd
    then finds the shared exponent bytes); strings keep their dictionaries. On the tiny vLLM
    teacher at 256 tokens top-20 this cut the encoding from ~0.75 to ~0.29 ms per answer and
    the top-K columns from 5.24 to 3.47 bytes per (token x alternative); see bench/README.md."""
    leaves = [leaf for f in schema for leaf in _leaves(f.name, f.type, in_list=False)]
    options: dict[str, Any] = {
        "compression": None if compression == "none" else compression,
        "use_dictionary": [
            p
            for p, t, in_list in leaves
            if not (in_list and _number(t)) and p != TOPK_COMPACT_COLUMN
        ],
        "use_byte_stream_split": [p for p, t, in_list in leaves if in_list and _float(t)],
    }
    if compression == "zstd" and TOPK_COMPACT_COLUMN in schema.names:
        # zstd 3 on the compact blobs: 187 vs 203 B/token at K=128 for ~3 us/token more
        # (bench/encodings.py); the other columns keep level 1.
        options["compression_level"] = {p: 3 if p == TOPK_COMPACT_COLUMN else 1 for p, *_ in leaves}
    return options


def _leaves(path: str, t: pa.DataType, in_list: bool) -> list[tuple[str, pa.DataType, bool]]:
    """Parquet leaf column paths (what per-column options name), their types, and whether
    they sit inside a list."""
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        return _leaves(f"{path}.list.element", t.value_type, True)
    if pa.types.is_struct(t):
        return [leaf for f in t for leaf in _leaves(f"{path}.{f.name}", f.type, in_list)]
    return [(path, t, in_list)]


def _float(t: pa.DataType) -> bool:
    return pa.types.is_floating(t)


def _number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)


def stamped(schema: pa.Schema, metadata: dict[str, Any]) -> pa.Schema:
    """``schema`` carrying our key-value metadata (provenance, unit, kind) and when it was
    written: readers find it in the file's footer (``read_metadata``)."""
    meta = dict(schema.metadata or {})
    metadata = {**metadata, "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    meta[METADATA_KEY] = orjson.dumps(metadata, option=orjson.OPT_SORT_KEYS)
    return schema.with_metadata(meta)


def write_shard(
    table: pa.Table,
    store: Store,
    rel: str,
    metadata: dict[str, Any],
    compression: str = "zstd",
    error: topk_codec.CodecError | None = None,
) -> str:
    """Write ``table`` with our key-value metadata as the object ``rel``; return its sha256.

    The object appears whole under a name unique to this attempt: nothing is renamed over an
    existing shard, and it counts only once the driver commits it (``harvest.outputs.manifest``)."""
    sink = store.open_stream(rel)
    try:
        schema = stamped(table.schema, metadata)
        with pq.ParquetWriter(sink, schema, **parquet_options(schema, compression)) as writer:
            writer.write_table(table, row_group_size=max(1, len(table)))
            writer.add_key_value_metadata(topk_entry(schema, error or topk_codec.CodecError()))
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return sink.sha256


def read_metadata(location: str) -> dict[str, Any]:
    """Our key-value metadata of one shard (a path or URI): the spec, teacher, schema version."""
    store, name = split_location(str(location))
    with store.open_input_file(name) as fh:
        meta = pq.read_metadata(fh).metadata or {}  # the footer's, with keys added at close
    out = orjson.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
    if TOPK_KEY in meta:
        out["topk_encoding"] = orjson.loads(meta[TOPK_KEY])
    return out
