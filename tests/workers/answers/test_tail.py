"""The compiled tail (workers/answers/_tail.c) against the numpy reference, value for value."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.answers import tail

pytestmark = pytest.mark.skipif(tail.compiled is None, reason="built without the compiled core")


def both(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty(x.shape[:-1], np.float32)
    assert tail.compiled.tail_rows(x, x.shape[-1], out)
    return out, tail.tail_logprob_numpy(x)


@pytest.mark.parametrize("k", [1, 5, 20, 64])
def test_random_rows_equal_the_reference(k):
    rng = np.random.default_rng(k)
    # server-like rows: sorted logprobs of a random distribution over 32,000 tokens
    logits = rng.normal(0, 3, (300, 32_000))
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tops = -np.sort(-lsm, axis=-1)[:, :k]
    got, want = both(tops)
    # the same float64 formula; only summation order differs, so the float32 results agree to
    # their last bit or one ulp either side
    np.testing.assert_array_max_ulp(got, want, maxulp=1)


def test_special_rows_equal_the_reference():
    rows = np.array(
        [
            [-np.inf, -np.inf, -np.inf],  # an empty top: all mass in the tail -> 0
            [math.log(0.5), math.log(0.5), -np.inf],  # the top K hold everything -> -inf
            [math.log(0.6), math.log(0.5), -3.0],  # rounding past 1 -> -inf, never NaN
            [-30.0, -31.0, -32.0],  # nearly nothing in the top -> a tail near 0
            [-1e-12, -40.0, -41.0],  # nearly everything in the top
            [np.nan, -1.0, -2.0],  # NaN stays NaN, as in numpy
            [np.inf, -1.0, -2.0],
        ]
    )
    got, want = both(rows)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_max_ulp(got[ok], want[ok], maxulp=1)
    assert got[0] == 0.0 and got[1] == -np.inf and got[2] == -np.inf


def test_public_function_takes_either_path_with_the_same_shapes():
    x = np.log(np.random.default_rng(0).random((4, 7, 5)) / 5)
    assert tail.tail_logprob(x).shape == (4, 7)
    np.testing.assert_array_max_ulp(tail.tail_logprob(x), tail.tail_logprob_numpy(x), maxulp=1)
    strided = x[:, ::2, :]  # not contiguous: the numpy path
    assert tail.tail_logprob(strided).shape == (4, 4)
    assert tail.tail_logprob(np.zeros((3, 0))).tolist() == [0.0, 0.0, 0.0]


def test_a_buffer_that_is_not_whole_rows_is_refused():
    out = np.empty(3, np.float32)
    assert not tail.compiled.tail_rows(np.zeros(10), 3, out)
    assert not tail.compiled.tail_rows(np.zeros(9), 0, out)
    assert not tail.compiled.tail_rows(np.zeros(9, np.float32), 3, out)
    assert not tail.compiled.tail_rows(np.zeros(9), 3, np.empty(2, np.float32))
