"""iter_batches / open_dataset on synthetic outputs: alignment, padding, tail mass, splits,
committed shards only, mixed teachers, bounded reads."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from synthetic_output import random_output, random_record, record, teacher, write_output

from harvest import iter_batches, open_dataset
from harvest.training import batches
from harvest.training.reader import MixedTeachersError
from harvest.training.targets import MissingPromptIds, examples_from_batch, tail_logprob
from schemas.records import record_schema

LN = math.log
# Prompt [11, 12, 13], response [21, 22]; top-2 per response token, best first.
HAND = record(
    "hand",
    [11, 12, 13],
    [21, 22],
    top_ids=[[21, 30], [40, 22]],
    top_lps=[[LN(0.5), LN(0.25)], [LN(0.6), LN(0.3)]],
    logprobs=[LN(0.5), LN(0.3)],
)


def one(out: Path, rec: dict, **kw) -> dict:
    write_output(out, [[rec]], k=len(rec["top_token_ids"][0]))
    kw.setdefault("pad_to", "max_len")
    [batch] = list(iter_batches(out, batch_size=4, max_len=kw.pop("max_len", 8), **kw))
    return batch


def ids(out: Path, **kw) -> list[str]:
    got = []
    for b in iter_batches(out, 3, 32, meta_columns=["request_id"], **kw):
        assert len(b["request_id"]) == len(b["input_ids"])
        got += b["request_id"]
    return got


def test_alignment_on_a_hand_built_record(tmp_path: Path) -> None:
    b = one(tmp_path, HAND)
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    # Logits at position 2 (token 13) predict token 21; at position 3 (token 21) predict 22.
    assert b["loss_mask"][0].nonzero()[0].tolist() == [2, 3]
    assert b["top_ids"][0, 2].tolist() == [21, 30] and b["top_ids"][0, 3].tolist() == [40, 22]
    np.testing.assert_allclose(b["top_logprobs"][0, 2], [LN(0.5), LN(0.25)], rtol=1e-6)
    np.testing.assert_allclose(b["top_logprobs"][0, 3], [LN(0.6), LN(0.3)], rtol=1e-6)
    np.testing.assert_allclose(b["logprobs"][0, 2:4], [LN(0.5), LN(0.3)], rtol=1e-6)
    np.testing.assert_allclose(b["tail_logprob"][0, 2:4], [LN(0.25), LN(0.1)], rtol=1e-5)
    # Off the targets: pad values, nothing trained.
    for name in ("top_ids", "top_logprobs", "logprobs", "tail_logprob"):
        assert not b[name][0, [0, 1, 4, 5, 6, 7]].any(), name
    assert (b["input_ids"].dtype, b["top_ids"].dtype, b["top_logprobs"].dtype) == (
        np.int64,
        np.int32,
        np.float32,
    )


def test_targets_predict_the_next_input_token_on_random_records(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = [random_record(f"r{i}", rng) for i in range(40)]
    write_output(tmp_path, [rows[:25], rows[25:]])
    by_id = {r["request_id"]: r for r in rows}
    checked = 0
    for b in iter_batches(tmp_path, 7, 12, meta_columns=["request_id"]):
        for i, rid in enumerate(b["request_id"]):
            rec = by_id[rid]
            p = len(rec["prompt_token_ids"])
            for t in b["loss_mask"][i].nonzero()[0]:
                j = t + 1 - p  # the response token the targets at t describe
                assert b["input_ids"][i, t + 1] == rec["token_ids"][j]
                assert b["top_ids"][i, t].tolist() == rec["top_token_ids"][j]
                assert b["logprobs"][i, t] == np.float32(rec["logprobs"][j])
                checked += 1
            # every response token inside the window is trained on
            seen = min(len(rec["token_ids"]), 12 - p)
            assert b["loss_mask"][i].sum() == max(0, seen)
    assert checked > 100


def test_truncation_and_padding(tmp_path: Path) -> None:
    b = one(tmp_path / "a", HAND, max_len=4)
    assert b["input_ids"].tolist() == [[11, 12, 13, 21]]
    assert b["loss_mask"].tolist() == [[False, False, True, False]]  # 22 was cut off
    b = one(tmp_path / "b", HAND, max_len=3)
    assert b["input_ids"].tolist() == [[11, 12, 13]] and not b["loss_mask"].any()
    b = one(tmp_path / "c", HAND, max_len=64, pad_to="longest", pad_id=7)
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22]]
    b = one(tmp_path / "d", HAND, max_len=7, pad_id=5)
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22, 5, 5]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0]]


def test_record_loss_mask_and_empty_prompt(tmp_path: Path) -> None:
    b = one(tmp_path / "m", {**HAND, "loss_mask": [False, True]})
    assert b["loss_mask"][0].nonzero()[0].tolist() == [3]
    b = one(tmp_path / "e", {**HAND, "prompt_token_ids": []})
    # Nothing predicts the first token of a sequence: only 22 (at position 1) is a target.
    assert b["input_ids"][0, :2].tolist() == [21, 22]
    assert b["loss_mask"][0].nonzero()[0].tolist() == [0]
    assert b["top_ids"][0, 0].tolist() == [40, 22]


def test_tail_mass() -> None:
    got = tail_logprob(np.log([[0.5, 0.25], [0.5, 0.5], [0.6, 0.5]]))
    assert got[0] == pytest.approx(LN(0.25), rel=1e-6)
    assert got[1] == -np.inf and got[2] == -np.inf  # all (or rounding past all) the mass
    tiny = tail_logprob(np.array([[-30.0, -31.0]]))[0]
    assert tiny == pytest.approx(math.log1p(-(math.exp(-30) + math.exp(-31))), rel=1e-3)
    assert tiny < 0
    nearly_all = tail_logprob(np.array([[math.log(0.5), math.log(0.5 - 1e-9)]]))[0]
    assert nearly_all == pytest.approx(LN(1e-9), rel=1e-4)
    # A top-1 just short of certainty: 1 - exp(x) would round to 0 (-inf); expm1 keeps it.
    assert tail_logprob(np.array([[-1e-20, -np.inf]]))[0] == pytest.approx(LN(1e-20), rel=1e-6)
    empty = tail_logprob(np.array([[-np.inf, -np.inf]]))[0]
    assert empty == 0.0  # nothing in the top K: the tail holds everything
    assert not np.isnan(tail_logprob(np.log(np.random.default_rng(0).random((500, 5))))).any()


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_are_disjoint_and_complete(tmp_path: Path, world_size: int, shuffle: bool) -> None:
    every = random_output(tmp_path, [5, 3, 7, 1, 4])  # 5 shards: not a multiple of 2, 3 or 4
    parts = [ids(tmp_path, rank=r, world_size=world_size, shuffle=shuffle) for r in range(2)]
    parts += [
        ids(tmp_path, rank=r, world_size=world_size, shuffle=shuffle) for r in range(2, world_size)
    ]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == sorted(every) and len(set(flat)) == len(every)
    assert all(parts)


def test_shuffle_is_seeded_and_changes_order(tmp_path: Path) -> None:
    every = random_output(tmp_path, [6] * 6)
    plain = ids(tmp_path)
    assert plain == every  # manifest (unit) order without shuffling
    a = ids(tmp_path, shuffle=True, seed=1, shuffle_buffer=8)
    assert a == ids(tmp_path, shuffle=True, seed=1, shuffle_buffer=8)
    assert sorted(a) == sorted(every) and a != plain
    assert a != ids(tmp_path, shuffle=True, seed=2, shuffle_buffer=8)


def test_drop_last(tmp_path: Path) -> None:
    random_output(tmp_path, [4, 3])
    sizes = [len(b["input_ids"]) for b in iter_batches(tmp_path, 3, 16)]
    assert sizes == [3, 3, 1]
    assert [len(b["input_ids"]) for b in iter_batches(tmp_path, 3, 16, drop_last=True)] == [3, 3]


def test_only_committed_shards_are_read(tmp_path: Path) -> None:
    every = random_output(tmp_path, [3, 3])
    data = tmp_path / "data"
    [first, *_] = sorted(data.glob("part-*.parquet"))
    other = tmp_path.parent / "other"
    random_output(other, [2, 2], seed=9)
    # A writer's temporary, an orphan from nowhere, and a shard whose unit never committed.
    shutil.copy(first, data / ".tmp-part-x_jsonl-00000000-000009.parquet.1a2b3c4d")
    for i, src in enumerate(sorted((other / "data").glob("*.parquet"))):
        shutil.copy(src, data / f"part-x_jsonl-00000000-00001{i}.parquet")
    assert len(list(data.iterdir())) == 5
    assert sorted(ids(tmp_path)) == sorted(every)
    assert len(open_dataset(tmp_path).files) == 2


def test_a_folder_mixing_two_teachers_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    shards = [[random_record(f"a{i}", rng)] for i in range(2)]
    idents = [teacher(), teacher(tokenizer_hash="tok-b")]
    write_output(tmp_path, shards, identities=idents)
    with pytest.raises(MixedTeachersError, match="different teachers or tokenizers"):
        next(iter_batches(tmp_path, 2, 16))
    with pytest.raises(MixedTeachersError):
        open_dataset(tmp_path)
    assert sum(len(b["input_ids"]) for b in iter_batches(tmp_path, 2, 16, allow_mixed=True)) == 2


@pytest.mark.parametrize("layout", ["null prompt ids", "no prompt ids column"])
def test_rows_without_prompt_ids_are_refused_naming_the_shard(tmp_path: Path, layout) -> None:
    schema = record_schema(2)
    i = schema.get_field_index("prompt_token_ids")
    if layout == "null prompt ids":  # as schema v2 shards were written before the ids were kept
        schema = schema.set(i, schema.field(i).with_nullable(True))
    else:  # as schema v1 shards were
        schema = schema.remove(i)
    [path] = write_output(tmp_path, [[{**HAND, "prompt_token_ids": None}]], k=2, schema=schema)
    with pytest.raises(MissingPromptIds, match=path.name) as err:
        list(iter_batches(tmp_path, 2, 16))
    assert "re-tokenising" in str(err.value)


def test_streaming_reads_one_shard_before_the_first_batch(tmp_path, monkeypatch) -> None:
    random_output(tmp_path, [5] * 20)
    opened: list[str] = []
    real = batches._read_fragment

    def counting(fragment: ds.Fragment, *args):
        opened.append(fragment.path)
        return real(fragment, *args)

    monkeypatch.setattr(batches, "_read_fragment", counting)
    it = iter_batches(tmp_path, 4, 32)
    next(it)
    assert len(opened) == 1
    it = iter_batches(tmp_path, 4, 32, shuffle=True, shuffle_buffer=8)
    opened.clear()
    next(it)
    assert len(opened) == 3  # 8 buffered rows + the first batch's 4 = 12 rows = 3 shards of 5
    rest = sum(len(b["input_ids"]) for b in it)
    assert rest == 96 and len(opened) == 20 and len(set(opened)) == 20


def test_a_sliced_record_batch_gives_the_same_examples(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rows = [random_record(f"r{i}", rng) for i in range(6)]
    [path] = write_output(tmp_path, [rows])
    [batch] = ds.dataset(path).to_batches()
    whole = examples_from_batch(batch, "x", 16)
    part = examples_from_batch(batch.slice(2, 3), "x", 16)
    for a, b in zip(whole[2:5], part, strict=True):
        assert a.start == b.start
        for name in ("input_ids", "top_ids", "top_logprobs", "logprobs", "loss_mask"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_several_outputs_of_one_teacher_read_as_one(tmp_path: Path) -> None:
    every = random_output(tmp_path / "a", [3, 2]) + random_output(tmp_path / "b", [4], 2, "b")
    outs = [tmp_path / "a", tmp_path / "b"]
    parts = [
        [x for b in iter_batches(outs, 2, 32, rank=r, world_size=2, meta_columns=["request_id"])
         for x in b["request_id"]]
        for r in range(2)
    ]  # fmt: skip
    assert sorted(parts[0] + parts[1]) == sorted(every) and not set(parts[0]) & set(parts[1])


def test_float16_shards_read_as_float32_batches(tmp_path: Path) -> None:
    """output.logprob_dtype float16: the same batches, logprobs rounded to half precision."""
    rng = np.random.default_rng(5)
    rows = [random_record(f"r{i}", rng) for i in range(12)]
    write_output(tmp_path / "32", [rows])
    write_output(tmp_path / "16", [rows], schema=record_schema(3, "float16"))
    b32 = next(iter_batches(tmp_path / "32", 12, 64, meta_columns=["request_id"]))
    b16 = next(iter_batches(tmp_path / "16", 12, 64, meta_columns=["request_id"]))
    assert list(b16["request_id"]) == list(b32["request_id"])
    assert b16["top_logprobs"].dtype == np.float32
    assert np.array_equal(b16["top_ids"], b32["top_ids"])
    expected = b32["top_logprobs"].astype(np.float16).astype(np.float32)
    assert np.array_equal(b16["top_logprobs"], expected)


def test_the_stored_tail_is_used_over_a_recomputed_one(tmp_path: Path) -> None:
    """A shard's tail_logprob column (the worker's, from full precision) is what batches carry."""
    rec = {**HAND, "tail_logprob": [-7.5, -3.25]}
    b = one(tmp_path, rec)
    assert b["tail_logprob"][0, 2:4].tolist() == [-7.5, -3.25]
