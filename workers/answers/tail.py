"""The teacher's probability mass outside its top K, per token, from full-precision logprobs.

Computed in the worker from the server's own (float64-parsed) values and stored as float32
beside the top-K columns, so a shard whose logprob columns are float16 still carries an exact
tail: recomputing it from rounded float16 top-K values loses most of its digits exactly where
the top K hold nearly all the mass (see bench/README.md for the measured error).
"""

from __future__ import annotations

import math

import numpy as np

try:  # optional, like the parser's core: numpy computes the same values, ~4x slower in situ
    from workers.answers import _tail as compiled
except ImportError:  # pragma: no cover - built without a C compiler
    compiled = None

LN2 = math.log(2.0)


def tail_logprob(top_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(top_logprobs))) over the last axis, as float32.

    Computed in float64 as log1mexp(logsumexp(top)): log1p(-exp(x)) when x < -ln 2,
    log(-expm1(x)) above (accurate when the top K hold almost everything). Defined values:
    K = 0 or a row of -inf gives 0 (all mass in the tail); when rounding makes the top K sum
    to 1 or more (logsumexp >= 0) the tail is -inf (no mass outside the top K), never NaN.
    """
    x = np.asarray(top_logprobs, dtype=np.float64)
    if x.shape[-1] == 0:
        return np.zeros(x.shape[:-1], dtype=np.float32)
    if compiled is not None and x.flags.c_contiguous:
        out = np.empty(x.shape[:-1], dtype=np.float32)
        if compiled.tail_rows(x, x.shape[-1], out):
            return out
    return tail_logprob_numpy(x)


def tail_logprob_numpy(x: np.ndarray) -> np.ndarray:
    """The reference computation of ``tail_logprob`` (float64 ``x``, K >= 1)."""
    peak = np.max(x, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)  # a row of -inf: empty top, all mass in tail
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.log(np.sum(np.exp(x - peak), axis=-1)) + peak[..., 0]
        lse = np.minimum(lse, 0.0)
        tail = np.where(lse < -LN2, np.log1p(-np.exp(lse)), np.log(-np.expm1(lse)))
    return tail.astype(np.float32)
