"""Shard writing: a durable whole-object write, and no silent nulls in non-nullable columns."""

from __future__ import annotations

import os
import random
import stat
from dataclasses import replace

import pyarrow as pa
import pytest

from schemas.wire import Sample
from workers.shards.columns import compact, data_columns, read_metadata, write_shard
from workers.storage import local as local_store
from workers.storage import open_store


def one_record(**over):
    rec = dict(
        request_id="r", prompt_id="p", sample_index=0, api="completions", prompt="x",
        response="y", completion_tokens=1, prompt_token_ids=[1, 2], token_ids=[3],
        logprobs=[-1.0], top_token_ids=[[3, 4]], top_logprobs=[[-1.0, -2.0]], teacher="t",
        attempts=1,
    )  # fmt: skip
    rec.update(over)
    return rec


def test_a_local_shard_is_durable_before_it_can_be_committed(tmp_path, monkeypatch):
    """On disk a shard write is the storage layer's whole-object write: bytes fsynced, moved
    into place, then the folder fsynced, so a commit never names a shard a crash could lose."""
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(local_store.os, "fsync", spy)
    cols = data_columns(2)
    cols.append(**one_record())
    write_shard(cols.table(), open_store(str(tmp_path)), "data/part-u-a1.parquet", {"kind": "data"})
    assert synced == [False, True]  # the file's bytes first, then the folder's new entry
    assert read_metadata(str(tmp_path / "data" / "part-u-a1.parquet"))["kind"] == "data"
    assert os.listdir(tmp_path / "data") == ["part-u-a1.parquet"]  # no temporary left


def test_a_null_in_a_non_nullable_column_is_refused():
    cols = data_columns(2)
    cols.append(**one_record(prompt_token_ids=None))  # pyarrow alone would write []
    with pytest.raises(ValueError, match="prompt_token_ids"):
        cols.table()
    ok = data_columns(2)
    ok.append(**one_record(loss_mask=None, finish_reason=None))  # nullable: fine
    assert ok.table().num_rows == 1


def _samples(k: int, rows: int = 6) -> list[Sample]:
    rng = random.Random(k)
    out = []
    for i in range(rows):
        n = rng.randrange(0, 40) if i else 0  # an empty answer too
        out.append(
            Sample(
                sample_index=0, response=f"r{i}", finish_reason="length",
                token_ids=[rng.randrange(32_000) for _ in range(n)],
                logprobs=[-rng.expovariate(0.5) for _ in range(n)],
                top_token_ids=[[rng.randrange(32_000) for _ in range(k)] for _ in range(n)],
                top_logprobs=[sorted((-rng.expovariate(0.3) for _ in range(k)), reverse=True)
                              for _ in range(n)],
            )
        )  # fmt: skip
    return out


def _table(samples: list[Sample], k: int, dtype: str = "float32") -> pa.Table:
    cols = data_columns(k, dtype)
    for s in samples:
        cols.append(
            **one_record(
                token_ids=s.token_ids, logprobs=s.logprobs, top_token_ids=s.top_token_ids,
                top_logprobs=s.top_logprobs, completion_tokens=len(s.token_ids),
            )
        )  # fmt: skip
    return cols.table()


@pytest.mark.parametrize("k", [0, 1, 3, 20])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_compact_samples_give_the_same_table_as_lists(k: int, dtype: str) -> None:
    samples = _samples(k)
    from_lists = _table(samples, k, dtype)
    from_arrays = _table([compact(s) for s in samples], k, dtype)
    assert from_arrays.equals(from_lists)
    assert from_arrays.schema.field("top_logprobs").type.value_type.value_type == (
        pa.float16() if dtype == "float16" else pa.float32()
    )
    mixed = _table([compact(s) if i % 2 else s for i, s in enumerate(samples)], k, dtype)
    assert mixed.equals(from_lists)


def test_compact_keeps_other_fields_and_values() -> None:
    s = _samples(3)[1]
    c = compact(s)
    assert (c.sample_index, c.response, c.finish_reason) == (0, "r1", "length")
    assert c.top_token_ids.shape == (len(s.token_ids), 3)
    assert c.top_logprobs.tolist() == s.top_logprobs and c.token_ids.tolist() == s.token_ids


def test_compact_rows_out_of_range_or_wrong_width_are_refused() -> None:
    big = compact(_samples(2)[1])
    big.token_ids[0] = 2**40
    with pytest.raises(pa.ArrowInvalid):
        _table([big], 2)
    with pytest.raises(pa.ArrowInvalid):  # the list path refuses it the same way
        _table([replace(_samples(2)[1], token_ids=[2**40])], 2)
    wide = compact(_samples(3)[1])
    with pytest.raises(ValueError, match="wide"):
        _table([wide], 2)


def test_warm_up_leaves_no_import_for_the_first_row_group() -> None:
    """pyarrow imports pandas on its first list conversion; the actor does it at start-up."""
    import subprocess
    import sys

    code = (
        "import sys, pyarrow as pa\n"
        "from workers.shards.columns import warm_up, data_columns\n"
        "warm_up()\n"
        "before = set(sys.modules)\n"
        "cols = data_columns(2)\n"
        "cols.append(request_id='r', prompt_id='p', sample_index=0, api='completions',\n"
        "            prompt='x', response='y', finish_reason='stop', prompt_tokens=1,\n"
        "            completion_tokens=1, prompt_token_ids=[1], token_ids=[2], logprobs=[-0.5],\n"
        "            top_token_ids=[[2, 3]], top_logprobs=[[-0.5, -1.0]], teacher='t',\n"
        "            endpoint='e', attempts=1, latency_ms=1.0)\n"
        "cols.table()\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] == 'pandas'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
