"""Shard writing: atomic rename made durable, and no silent nulls in non-nullable columns."""

from __future__ import annotations

import os
import stat

import pytest

from workers import writer
from workers.writer import data_columns, write_shard


def one_record(**over):
    rec = dict(
        request_id="r", prompt_id="p", sample_index=0, api="completions", prompt="x",
        response="y", completion_tokens=1, prompt_token_ids=[1, 2], token_ids=[3],
        logprobs=[-1.0], top_token_ids=[[3, 4]], top_logprobs=[[-1.0, -2.0]], teacher="t",
        attempts=1,
    )  # fmt: skip
    rec.update(over)
    return rec


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(writer.os, "fsync", spy)
    cols = data_columns(2)
    cols.append(**one_record())
    write_shard(cols.table(), tmp_path / "data" / "part-u.parquet", {"kind": "data"})
    assert synced == [False, True]  # the file's bytes first, then the folder's new entry


def test_a_null_in_a_non_nullable_column_is_refused():
    cols = data_columns(2)
    cols.append(**one_record(prompt_token_ids=None))  # pyarrow alone would write []
    with pytest.raises(ValueError, match="prompt_token_ids"):
        cols.table()
    ok = data_columns(2)
    ok.append(**one_record(loss_mask=None, finish_reason=None))  # nullable: fine
    assert ok.table().num_rows == 1
