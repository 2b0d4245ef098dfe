"""A shard written row group by row group: same rows as one table, bounded buffer, no partial
object under the shard's name."""

from __future__ import annotations

import asyncio
import hashlib
import time

import httpx
import jobs
import pyarrow.parquet as pq
import pytest
from fake_teacher import FakeTeacher
from test_unit import harvest, rows
from test_writer import _samples, _table, one_record

from schemas.records import record_schema
from schemas.wire import PromptRow
from workers.shards import writer as shard_writer
from workers.shards.columns import compact, read_metadata
from workers.shards.writer import ShardWriter
from workers.storage import open_store


def _append(writer: ShardWriter, samples) -> None:
    for s in samples:
        writer.append(
            **one_record(
                token_ids=s.token_ids, logprobs=s.logprobs, top_token_ids=s.top_token_ids,
                top_logprobs=s.top_logprobs, completion_tokens=len(s.token_ids),
            )
        )  # fmt: skip


def test_row_groups_hold_the_same_rows_as_one_table(tmp_path) -> None:
    samples = [compact(s) for s in _samples(3, rows=7)]
    writer = ShardWriter(
        open_store(str(tmp_path)), "data/s.parquet", record_schema(3), {"kind": "data"}, max_rows=3
    )

    async def go() -> str | None:
        for s in samples:
            _append(writer, [s])
            if writer.due:
                await writer.flush()
        return await writer.close()

    sha = asyncio.run(go())
    path = tmp_path / "data" / "s.parquet"
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert pq.ParquetFile(path).metadata.num_row_groups == 3  # 3 + 3 + the last 1
    assert pq.read_table(path).equals(_table(samples, 3))  # no metadata in the comparison
    assert read_metadata(str(path))["kind"] == "data" and writer.rows == 7
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["s.parquet"]


def test_a_byte_budget_makes_a_row_group_due() -> None:
    writer = ShardWriter(
        open_store("/nonexistent"), "x.parquet", record_schema(20), {}, max_bytes=1000
    )
    (big,) = [compact(s) for s in _samples(20, rows=2)[1:]]
    assert len(big.token_ids) * 20 * 16 > 1000
    assert not writer.due
    _append(writer, [big])
    assert writer.due


def test_an_empty_shard_is_written_only_when_asked(tmp_path) -> None:
    store = open_store(str(tmp_path))
    none = ShardWriter(store, "failed/f.parquet", record_schema(2), {})
    assert asyncio.run(none.close()) is None and not (tmp_path / "failed").exists()
    empty = ShardWriter(store, "data/d.parquet", record_schema(2), {})
    assert asyncio.run(empty.close(empty=True))
    assert pq.read_table(tmp_path / "data" / "d.parquet").num_rows == 0


def test_an_aborted_shard_leaves_nothing_even_after_row_groups(tmp_path) -> None:
    writer = ShardWriter(
        open_store(str(tmp_path)), "data/a.parquet", record_schema(3), {}, max_rows=1
    )

    async def go() -> None:
        _append(writer, [compact(s) for s in _samples(3, rows=2)])
        await writer.flush()
        writer.abort()

    asyncio.run(go())
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(writer.close())


def test_a_unit_streams_its_rows_in_several_row_groups(tmp_path, monkeypatch) -> None:
    """One row per row group: the unit's shards still hold every row once per sample."""
    monkeypatch.setattr(shard_writer, "MAX_ROWS", 1)

    def reject(body, n):
        if body.get("prompt") == "too long":
            return httpx.Response(400, json={"error": {"message": "too long"}})
        return None

    result = harvest(tmp_path, FakeTeacher(script=reject))
    data = pq.ParquetFile(tmp_path / result.data_path)
    failed = pq.ParquetFile(tmp_path / result.failed_path)
    assert data.metadata.num_row_groups > 1 and failed.metadata.num_row_groups > 1
    keys = sorted((r["prompt_id"], r["sample_index"]) for r in data.read().to_pylist())
    assert keys == [("a", 0), ("a", 1), ("c", 0), ("c", 1), ("one", 0)]
    assert data.metadata.num_rows == result.data_rows == 5
    assert failed.metadata.num_rows == result.failure_rows == 4
    assert len(rows()) == result.prompts


def test_per_token_numbers_skip_dictionaries_and_floats_are_byte_stream_split(tmp_path) -> None:
    """The encoding measured in bench/README.md: cheaper to write and smaller on a real teacher."""
    writer = ShardWriter(open_store(str(tmp_path)), "d.parquet", record_schema(3), {})
    _append(writer, [compact(s) for s in _samples(3)])
    asyncio.run(writer.close())
    meta = pq.ParquetFile(tmp_path / "d.parquet").metadata
    enc = {
        meta.row_group(0).column(i).path_in_schema.split(".")[0]: meta.row_group(0)
        .column(i)
        .encodings
        for i in range(meta.num_columns)
    }
    assert "BYTE_STREAM_SPLIT" in enc["top_logprobs"] and "BYTE_STREAM_SPLIT" in enc["logprobs"]
    for col in ("top_token_ids", "token_ids", "prompt_token_ids", "top_logprobs"):
        assert "RLE_DICTIONARY" not in enc[col]
    assert "RLE_DICTIONARY" in enc["prompt_id"]


def test_no_request_is_sent_while_two_row_groups_wait(tmp_path, monkeypatch) -> None:
    """A writer thread slower than the teacher holds requests back instead of letting answers
    pile up: while the first row group is held in the thread, the teacher gets no more than
    one more row group's requests plus those already in flight."""
    monkeypatch.setattr(shard_writer, "MAX_ROWS", 2)
    sent: list[int] = []
    real_write = ShardWriter._write
    held: list[int] = []

    def count(body, n):
        sent.append(n)
        return None

    def slow_write(self, cols) -> None:
        if not held:  # the first row group: held until the teacher has had every row, or ~2 s
            for _ in range(200):
                if len(sent) >= 40:
                    break
                time.sleep(0.01)
            held.append(len(sent))
        real_write(self, cols)

    monkeypatch.setattr(ShardWriter, "_write", slow_write)
    spec = jobs.spec(
        jobs.model("fake", "http://teacher-a:8000"),
        sampling={"max_tokens": 4, "n": 1, "logprobs": 2},
        concurrency={"in_flight_per_endpoint": 3},
    )
    unit_rows = [PromptRow(f"p{i}", f"in:{i}", prompt=f"row {i}") for i in range(40)]
    result = harvest(tmp_path, FakeTeacher(script=count), unit_rows, spec)
    assert result.data_rows == 40 and len(sent) == 40  # nothing lost on the way
    # held back: the first group (2), the next one filling (2) and the 3 in flight at most
    assert len(held) == 1 and held[0] <= 2 + 2 + 3
    data = pq.ParquetFile(tmp_path / result.data_path)
    sizes = [data.metadata.row_group(i).num_rows for i in range(data.metadata.num_row_groups)]
    assert max(sizes) <= 2 + 3 and sum(sizes) == 40
