"""Build Arrow tables from harvested records and write them as Parquet shards on any store.

Each attempt at a unit writes its shards under names of its own (``part-<unit>-<attempt>``),
in one whole-object write; whether a shard is part of the output is decided by the driver's
commit alone, so a partial or duplicate attempt is never read (see ``harvest.manifest``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.records import FAILURE_SCHEMA, METADATA_KEY, record_schema
from workers.storage import Store, split_location


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
    table: pa.Table, store: Store, rel: str, metadata: dict[str, Any], compression: str = "zstd"
) -> str:
    """Write ``table`` with our key-value metadata as the object ``rel``; return its sha256.

    One whole-object write under a name unique to this attempt: nothing is renamed, and the
    shard counts only once the driver commits it (``harvest.manifest``)."""
    meta = dict(table.schema.metadata or {})
    metadata = {**metadata, "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    meta[METADATA_KEY] = orjson.dumps(metadata, option=orjson.OPT_SORT_KEYS)
    return store.write_table(table.replace_schema_metadata(meta), rel, compression)


def read_metadata(location: str) -> dict[str, Any]:
    """Our key-value metadata of one shard (a path or URI): the spec, teacher, schema version."""
    store, name = split_location(str(location))
    with store.open_input_file(name) as fh:
        meta = pq.read_schema(fh).metadata or {}
    return orjson.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
