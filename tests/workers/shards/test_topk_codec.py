"""The compact top-K codec: round trips within the error it reports, on edge cases too."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from schemas.records import record_schema
from workers.shards import topk_codec
from workers.shards.columns import data_columns, parquet_options


def tops(n: int, k: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int64)
    lps = np.sort(rng.normal(-6, 3, (n, k)), axis=1)[:, ::-1] - 0.1
    return ids, lps.copy()


def by_id(ids: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, o, 1), np.take_along_axis(lps, o, 1)


@pytest.mark.parametrize(
    ("n", "k", "vocab"), [(5, 1, 10), (7, 20, 32_000), (3, 128, 49_152), (4, 64, 200_000)]
)
def test_round_trip_within_the_reported_error(n: int, k: int, vocab: int) -> None:
    ids, lps = tops(n, k, vocab)
    blob, err = topk_codec.encode(ids, lps)
    got_ids, got_lps = topk_codec.decode(blob)
    assert got_ids.dtype == np.int32 and got_lps.dtype == np.float32
    assert (np.diff(got_lps, axis=1) <= 0).all()  # best first
    a_ids, a_lps = by_id(ids, lps)
    b_ids, b_lps = by_id(got_ids.astype(np.int64), got_lps.astype(np.float64))
    assert (a_ids == b_ids).all()  # ids are lossless
    worst = float(np.abs(a_lps - b_lps).max())
    assert worst <= err.max_abs_logprob_error + 1e-7 and err.max_abs_logprob_error <= 1 / 32 + 1e-6
    assert np.isclose(topk_codec.top_k_kl(a_lps, b_lps).sum(), err.kl_sum, rtol=1e-4, atol=1e-12)
    assert got_lps[:, 0].tolist() == lps[:, 0].astype(np.float32).tolist()  # the best is exact


def test_empty_records_and_a_deep_tail() -> None:
    for n, k in ((0, 8), (3, 0)):
        ids, lps = topk_codec.decode(topk_codec.encode(np.zeros((n, k), np.int64),
                                                       np.zeros((n, k)))[0])  # fmt: skip
        assert ids.shape == lps.shape == (n, k)
    ids = np.array([[1, 2, 3]])
    lps = np.array([[-0.1, -9999.0, -5000.0]])  # vLLM's stand-in for -inf, past the clamp
    blob, err = topk_codec.encode(ids, lps)
    _, got = topk_codec.decode(blob)
    assert err.max_abs_logprob_error > 1000  # clamped, and the shard's error says so
    assert got[0, 0] == np.float32(-0.1)
    with pytest.raises(ValueError, match="bad magic"):
        topk_codec.decode(b"XXXX" + blob[4:])


def test_columns_encode_and_decode_batch_restores_the_float32_layout() -> None:
    ids, lps = tops(6, 16, 5000, seed=3)
    cols = data_columns(16, "float32", "compact")
    cols.append(
        request_id="r", prompt_id="p", sample_index=0, api="completions", prompt="x",
        response="y", completion_tokens=6, prompt_token_ids=[1], token_ids=ids[:, 0],
        logprobs=lps[:, 0], top_token_ids=ids, top_logprobs=lps, teacher="t", attempts=1,
    )  # fmt: skip
    table = cols.table()
    assert "top_k_compact" in table.schema.names and "top_logprobs" not in table.schema.names
    assert cols.error.positions == 6 and 0 < cols.error.max_abs_logprob_error <= 1 / 32 + 1e-6
    back = topk_codec.decode_batch(table)
    plain = record_schema(16)
    assert back.schema.names == plain.names
    assert back.schema.field("top_logprobs").type == plain.field("top_logprobs").type
    assert topk_codec.top_k_of(table.schema) == topk_codec.top_k_of(back.schema) == 16
    wanted = ["token_ids", "top_token_ids", "top_logprobs"]
    assert topk_codec.scan_columns(table.schema, wanted) == ["token_ids", "top_k_compact"]
    opts = parquet_options(table.schema)
    assert "top_k_compact" not in opts["use_dictionary"]
    assert opts["compression_level"]["top_k_compact"] == 3
    assert isinstance(back, pa.Table)
