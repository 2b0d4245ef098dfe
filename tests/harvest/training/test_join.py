"""Several teachers' scored outputs of the same records, joined into per-teacher targets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from synthetic_output import random_record, write_output

import harvest
from harvest.training.join import JoinError, iter_joined


def two_teachers(tmp_path, change=None, drop=None):
    """Output a (K=3) and output b (K=2): the same sequences, other targets, other row order."""
    rng = np.random.default_rng(5)
    shards = [[random_record(f"u{u}-r{r}", rng) for r in range(n)] for u, n in enumerate([7, 4])]
    other = []
    for rows in shards:
        rows_b = []
        for row in reversed(rows):  # another arrival order
            b = copy.deepcopy(row)
            b["top_token_ids"] = [[t + 1, t + 2] for t in b["token_ids"]]
            b["top_logprobs"] = [[-0.5, -1.5]] * len(b["token_ids"])
            b["logprobs"] = [-0.25] * len(b["token_ids"])
            rows_b.append(b)
        other.append(rows_b)
    if change:
        change(other)
    if drop:
        other[drop[0]].pop(drop[1])
    write_output(tmp_path / "a", shards, k=3)
    write_output(tmp_path / "b", other, k=2)
    return shards


def test_per_teacher_targets_are_aligned(tmp_path):
    shards = two_teachers(tmp_path)
    by_id = {r["request_id"]: r for rows in shards for r in rows}
    outs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    seen = []
    for batch in harvest.iter_joined(outs, 4, 64, meta_columns=("request_id",)):
        assert batch["teachers"]["a"]["top_ids"].shape[2] == 3
        assert batch["teachers"]["b"]["top_ids"].shape[2] == 2
        for i, rid in enumerate(batch["request_id"]):
            rec = by_id[rid]
            p, r = len(rec["prompt_token_ids"]), len(rec["token_ids"])
            seq = rec["prompt_token_ids"] + rec["token_ids"]
            assert batch["input_ids"][i, : len(seq)].tolist() == seq
            at = slice(p - 1, p - 1 + r)  # position t holds the targets of token t + 1
            assert batch["loss_mask"][i, at].all() and batch["loss_mask"][i].sum() == r
            a, b = batch["teachers"]["a"], batch["teachers"]["b"]
            assert a["top_ids"][i, at].tolist() == rec["top_token_ids"]
            assert np.allclose(a["logprobs"][i, at], rec["logprobs"])
            assert b["top_ids"][i, at].tolist() == [[t + 1, t + 2] for t in rec["token_ids"]]
            assert np.allclose(b["logprobs"][i, at], -0.25)
            assert np.allclose(b["top_logprobs"][i, at], [-0.5, -1.5])
            seen.append(rid)
    assert sorted(seen) == sorted(by_id)


def test_ranks_split_the_records_between_them(tmp_path):
    shards = two_teachers(tmp_path)
    outs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    parts = [
        [rid for b in iter_joined(outs, 3, 64, r, 2, True, 1, meta_columns=("request_id",))
         for rid in b["request_id"]]
        for r in range(2)
    ]  # fmt: skip
    assert sorted(parts[0] + parts[1]) == sorted(r["request_id"] for rows in shards for r in rows)
    assert not set(parts[0]) & set(parts[1])


def test_other_token_ids_are_refused_naming_the_record(tmp_path):
    def change(other):
        other[1][2]["token_ids"] = [9, *other[1][2]["token_ids"][1:]]

    shards = two_teachers(tmp_path, change=change)
    rid = list(reversed(shards[1]))[2]["request_id"]
    outs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    with pytest.raises(JoinError, match=f"request_id {rid} .*other token_ids in 'b'"):
        list(iter_joined(outs, 4, 64))


def test_a_record_missing_from_one_teacher_is_refused(tmp_path):
    shards = two_teachers(tmp_path, drop=(0, 0))
    rid = shards[0][-1]["request_id"]  # b's first row is a's last
    with pytest.raises(JoinError, match=f"request_id {rid} .*missing from 'b'"):
        list(iter_joined({"a": tmp_path / "a", "b": tmp_path / "b"}, 4, 64))


def test_outputs_of_other_units_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    write_output(tmp_path / "a", [[random_record("x", rng)], [random_record("y", rng)]])
    write_output(tmp_path / "b", [[random_record("x", rng)]])
    with pytest.raises(JoinError, match="different units"):
        list(iter_joined({"a": tmp_path / "a", "b": tmp_path / "b"}, 4, 64))


def test_joined_batches_pad_to_the_longest_row_and_count_what_max_len_cut(tmp_path):
    shards = two_teachers(tmp_path)
    outs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    longest = max(len(r["prompt_token_ids"]) + len(r["token_ids"]) for s in shards for r in s)
    widths = {b["input_ids"].shape[1] for b in iter_joined(outs, 64, 1024)}
    assert widths == {longest}  # not max_len=1024
    from harvest.training.batches import TruncatedTargets

    short = min(len(r["prompt_token_ids"]) for s in shards for r in s) + 1
    with pytest.warns(TruncatedTargets, match=f"max_len={short} cut"):
        batches = list(iter_joined(outs, 64, short))
    assert {b["input_ids"].shape[1] for b in batches} == {short}
