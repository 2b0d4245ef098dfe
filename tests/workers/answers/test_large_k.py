"""The compiled core at K=128 (and 129 entries per token): no hidden K limit, same answer as
the dict path, a repeated id still sends the body to the checked path."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from workers.answers import fastparse

K = 128


def entries(tokens: int) -> list[dict[str, float]]:
    """Per token K or K+1 alternatives over a 50,000-id range, not in logprob order."""
    rng = np.random.default_rng(5)
    out = []
    for t in range(tokens):
        ids = rng.choice(50_000, K + t % 2, replace=False)
        lps = -rng.gamma(2.0, 3.0, len(ids))
        out.append({f"token_id:{i}": float(v) for i, v in zip(ids, lps, strict=True)})
    return out


def best_k(entry: dict[str, float]) -> tuple[list[int], list[float]]:
    best = sorted(entry.items(), key=lambda kv: -kv[1])[:K]
    return [int(key.split(":")[1]) for key, _ in best], [v for _, v in best]


@pytest.fixture
def core():
    if fastparse.compiled is None:
        pytest.skip("the compiled core is not built (test_parse says what that costs)")
    return fastparse.compiled


def test_fill_and_scan_at_k128_agree_with_a_sort(core) -> None:
    tops = entries(6)
    ids, lps = np.zeros((6, K), np.int64), np.zeros((6, K), np.float64)
    assert core.fill_top_k(tops, K, ids, lps)
    body = orjson.dumps({"choices": [{"logprobs": {"top_logprobs": tops}}]})
    _, s_ids, s_lps, rows = core.scan_top_k(body, K)
    assert rows == [6]
    s_ids = np.frombuffer(s_ids, np.int64).reshape(6, K)
    s_lps = np.frombuffer(s_lps, np.float64).reshape(6, K)
    for t, entry in enumerate(tops):
        want_ids, want_lps = best_k(entry)
        assert ids[t].tolist() == s_ids[t].tolist() == want_ids
        assert lps[t].tolist() == s_lps[t].tolist() == want_lps


def test_a_repeated_id_late_in_a_large_entry_falls_back(core) -> None:
    tops = entries(2)
    body = orjson.dumps({"choices": [{"logprobs": {"top_logprobs": tops}}]})
    keys = list(tops[1])
    repeated = body.replace(f'"{keys[100]}"'.encode(), f'"{keys[3]}"'.encode())
    assert repeated != body
    assert core.scan_top_k(repeated, K) is None  # the checked (dict) path decides
    assert core.scan_top_k(body, K) is not None
