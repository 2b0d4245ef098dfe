"""Shard writing: a durable whole-object write, and no silent nulls in non-nullable columns."""

from __future__ import annotations

import os
import stat

import pytest

from workers import storage_backends
from workers.storage import Store
from workers.writer import data_columns, read_metadata, write_shard


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

    monkeypatch.setattr(storage_backends.os, "fsync", spy)
    cols = data_columns(2)
    cols.append(**one_record())
    write_shard(cols.table(), Store(str(tmp_path)), "data/part-u-a1.parquet", {"kind": "data"})
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
