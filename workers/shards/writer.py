"""Write one shard a row group at a time, as a unit's answers arrive.

A worker used to hold a whole unit's answers (2,000 rows by default) until the unit ended; now
it holds per open shard one row group being written and one filling (``max_rows`` rows or
``max_bytes`` of answer arrays, whichever comes first), plus the answers in flight, so its
memory no longer grows with ``rows_per_shard``. Building the Arrow table and encoding the row
group run in a thread, one row group at a time per shard, so the actor's event loop keeps
sending requests meanwhile, until the next row group is due too (``room``): then new requests
wait for the thread. The object appears under its
attempt-unique name only on ``close`` and counts only once the driver commits it
(``harvest.outputs.manifest``); an aborted shard is dropped, and leftovers are never read.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.shards.columns import Columns, parquet_options, stamped, topk_entry
from workers.shards.topk_codec import CodecError
from workers.storage import PieceWriter, Store

MAX_ROWS = 1000  # rows per row group when answers are small
MAX_BYTES = 8 << 20  # numpy bytes per row group: ~100 answers of 256 tokens at top-20


class ShardWriter:
    """One shard of one attempt: ``append`` rows, ``await flush()`` when ``due``, then
    ``await close()`` (publish, sha256) or ``abort()``."""

    def __init__(
        self,
        store: Store,
        rel: str,
        schema: pa.Schema,
        metadata: dict[str, Any],
        compression: str = "zstd",
        *,
        max_rows: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.store, self.rel, self.schema = store, rel, schema
        self.metadata, self.compression = metadata, compression
        self.max_rows, self.max_bytes = max_rows or MAX_ROWS, max_bytes or MAX_BYTES
        self.rows = 0  # appended so far
        self._cols = Columns(schema)
        self._bytes = 0
        self._sink: PieceWriter | None = None
        self._writer: pq.ParquetWriter | None = None
        self._turn = asyncio.Lock()  # one row group in a thread at a time, in order
        self._io = threading.Lock()  # the thread's writes vs. an abort from the event loop
        self._aborted = False
        self.topk_error = CodecError()  # a compact top-K's error over the rows written so far

    def append(self, **values: Any) -> None:
        self._cols.append(**values)
        self.rows += 1
        self._bytes += sum(v.nbytes for v in values.values() if type(v) is np.ndarray)

    @property
    def due(self) -> bool:
        """Enough rows buffered for a row group."""
        return len(self._cols) >= self.max_rows or self._bytes >= self.max_bytes

    async def room(self) -> None:
        """Wait while a row group is due and the previous one is still in the thread: callers
        wait here before asking the teacher for more, so answers cannot pile up in memory
        faster than the thread writes them (a parser faster than the writer did that)."""
        while self.due and self._turn.locked():
            async with self._turn:  # FIFO: the flushes queued before us run first
                pass

    async def flush(self) -> None:
        """Write what is buffered as one row group, off the event loop."""
        async with self._turn:
            if not len(self._cols):
                return
            cols, self._cols, self._bytes = self._cols, Columns(self.schema), 0
            await asyncio.to_thread(self._write, cols)

    async def close(self, *, empty: bool = False) -> str | None:
        """Publish the shard and return its sha256; None (and nothing written) when it has no
        rows, unless ``empty`` asks for a shard anyway."""
        await self.flush()
        async with self._turn:
            if self._writer is None and not empty:
                return None
            return await asyncio.to_thread(self._finish)

    def abort(self) -> None:
        """Drop the shard (a fatal error or a cancelled unit): nothing appears under its name."""
        with self._io:
            self._aborted = True
            if self._sink is not None:
                self._sink.abort()

    def _open(self) -> pq.ParquetWriter:
        if self._writer is None:
            schema = stamped(self.schema, self.metadata)  # written_at: the first row group's
            self._sink = self.store.open_stream(self.rel)
            self._writer = pq.ParquetWriter(
                self._sink, schema, **parquet_options(schema, self.compression)
            )
        return self._writer

    def _write(self, cols: Columns) -> None:
        table = cols.table()  # built here: the conversion (and any top-K encoding) is CPU too
        self.topk_error.add(cols.error)
        with self._io:
            if self._aborted:
                return
            self._open().write_table(table, row_group_size=len(table))

    def _finish(self) -> str:
        with self._io:
            if self._aborted:
                raise RuntimeError(f"{self.rel}: shard was aborted")
            writer = self._open()
            writer.add_key_value_metadata(topk_entry(self.schema, self.topk_error))
            writer.close()
            assert self._sink is not None
            self._sink.close()
            return self._sink.sha256
