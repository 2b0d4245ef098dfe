"""iter_batches(pack=True): whole sequences per row, restarting positions, cu_seqlens, no target
across a boundary; truncation counted and warned about, never silent."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from synthetic_output import random_record, write_output
from test_batches import HAND

from harvest.training.batches import TruncatedTargets, iter_batches
from harvest.training.packing import block_diagonal_mask


def random_output(out: Path, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = [random_record(f"r{i}", rng) for i in range(n)]
    write_output(out, [rows])
    return rows


def test_packed_rows_hold_whole_sequences_with_their_own_targets(tmp_path: Path) -> None:
    rows = {r["request_id"]: r for r in random_output(tmp_path, 30)}
    padded = {  # the same records, one per row: the reference for every target
        rid: (b, i)
        for b in iter_batches(tmp_path, 4, 24, meta_columns=["request_id"])
        for i, rid in enumerate(b["request_id"])
    }
    seen = []
    for b in iter_batches(tmp_path, 3, 24, pack=True, meta_columns=["request_id"]):
        assert b["input_ids"].shape[1] <= 24
        for r, (cu, rids) in enumerate(zip(b["cu_seqlens"], b["request_id"], strict=True)):
            assert cu.dtype == np.int32 and cu[0] == 0 and len(cu) == len(rids) + 1
            assert cu[-1] == b["attention_mask"][r].sum()
            for j, rid in enumerate(rids):
                lo, hi = int(cu[j]), int(cu[j + 1])
                pb, pi = padded[rid]
                s = hi - lo
                assert b["position_ids"][r, lo:hi].tolist() == list(range(s))
                assert (b["seq_index"][r, lo:hi] == j).all()
                assert b["input_ids"][r, lo:hi].tolist() == pb["input_ids"][pi, :s].tolist()
                # every target of this sequence sits inside it and predicts a token inside it
                targets = np.nonzero(b["loss_mask"][r, lo:hi])[0]
                assert not len(targets) or targets.max() + 1 < s
                assert targets.tolist() == np.nonzero(pb["loss_mask"][pi])[0].tolist()
                for name in ("top_ids", "top_logprobs", "logprobs", "tail_logprob"):
                    np.testing.assert_array_equal(b[name][r, lo:hi], pb[name][pi, :s])
                seen.append(rid)
    assert sorted(seen) == sorted(rows)  # every record once


def test_packing_fills_rows(tmp_path: Path) -> None:
    random_output(tmp_path, 40)
    pad = [b["attention_mask"] for b in iter_batches(tmp_path, 4, 32)]
    packed = [b["attention_mask"] for b in iter_batches(tmp_path, 4, 32, pack=True)]
    frac = [sum(int((m == 0).sum()) for m in ms) / sum(m.size for m in ms) for ms in (pad, packed)]
    assert frac[1] < frac[0]
    assert sum(int(m.sum()) for m in pad) == sum(int(m.sum()) for m in packed)


def test_block_diagonal_mask() -> None:
    m = block_diagonal_mask(np.array([0, 2, 5], dtype=np.int32), 6)
    assert m[1].tolist() == [True, True, False, False, False, False]
    assert m[4].tolist() == [False, False, True, True, True, False]
    assert not m[5].any()  # padding attends to nothing


def test_truncated_targets_are_counted_and_warned_about(tmp_path: Path) -> None:
    write_output(tmp_path, [[HAND, {**HAND, "request_id": "h2", "prompt_id": "h2"}]], k=2)
    for pack in (False, True):
        it = iter_batches(tmp_path, 4, 4, pack=pack)
        with pytest.warns(TruncatedTargets, match="cut 2 trained target tokens from 2 records"):
            list(it)
        assert (it.truncated_targets, it.truncated_rows) == (2, 2)
    it = iter_batches(tmp_path, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(it)
    assert it.truncated_targets == 0
