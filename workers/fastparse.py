"""The fast path of ``workers.parse``: a whole choice in C-level and numpy passes.

Speed: a 256-token top-20 answer holds ~5,000 alternatives, so per-alternative Python calls
dominated a worker's CPU. ``fast_sample`` checks a whole choice with C-level passes: types by
``set(map(type, ...))``, all alternatives' ids from their joined bytes in a few numpy passes,
their logprobs as one float64 array, and the best K of every token by one stable argsort. Top-K
arrives as (tokens, K) int64 / float64 arrays. It gives up (``None``) at the first doubt; the
per-token checked path (``workers.parse``) then decides and names the problem. The fast path
accepts only answers the checked path accepts, and returns the same values for them
(tests/workers/test_parse.py compares both, on real answers and random edits of them).
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np

from schemas.wire import Sample

PREFIX = "token_id:"
_CUT = len(PREFIX)
MAX_DIGITS = 18  # any vocabulary id fits; int64 still holds it
_NUMBER_TYPES = frozenset((float, int))


def _numbers(values: Any) -> bool:
    return set(map(type, values)) <= _NUMBER_TYPES


def _fast_top_k(tops: Any, n: int, k: int) -> tuple[Any, Any] | None:
    """Top ``k`` ids (int64) and logprobs (float64) per token as (n, k) arrays, best first;
    None unless every entry is a dict of K or K+1 ``token_id:N`` -> float pairs."""
    if type(tops) is not list or len(tops) != n or set(map(type, tops)) != {dict}:
        return None
    widths = np.fromiter(map(len, tops), np.int64, n)
    if widths.min() < k or widths.max() > k + 1:
        return None
    values = list(chain.from_iterable(map(dict.values, tops)))
    if set(map(type, values)) != {float}:  # ints, bools, None...: the checked path decides
        return None
    keys = list(chain.from_iterable(tops))
    ids = _key_ids(keys)
    if ids is None:
        return None
    return _best(ids, np.array(values, np.float64), widths, k)


_PREFIX_BYTES = PREFIX.encode()
_NEXT = b"\n" + _PREFIX_BYTES
_PLACES = 10 ** np.arange(MAX_DIGITS - 1, -1, -1, dtype=np.int64)
_FLOAT_PLACES = _PLACES.astype(np.float64)


def _key_ids(keys: list[str]) -> np.ndarray | None:
    """The ids of ``token_id:N`` strings in a few numpy passes over their joined bytes; None
    unless every one is exactly the prefix and 1-18 ASCII digits (what ``_token_id`` takes,
    with the same value: leading zeros included)."""
    try:
        joined = "\n".join(keys).encode()
    except (TypeError, UnicodeEncodeError):  # a non-string, a lone surrogate
        return None
    if not joined.startswith(_PREFIX_BYTES) or joined.count(_NEXT) != len(keys) - 1:
        return None
    b = np.frombuffer(joined, np.uint8)
    ends = np.flatnonzero(b == 10)
    if len(ends) != len(keys) - 1:  # a key holding a newline
        return None
    ends = np.append(ends, len(b))  # each key ends there, and starts with the prefix (counted)
    lengths = np.diff(ends, prepend=-1) - 1 - _CUT
    width = int(lengths.max())
    if lengths.min() < 1 or width > MAX_DIGITS:
        return None
    at = ends[:, None] - width + np.arange(width)  # the last ``width`` bytes of each key
    used = at >= (ends - lengths)[:, None]
    digits = b[at] - 48  # uint8: bytes below '0' wrap to large values
    if ((digits > 9) & used).any():
        return None
    digits[~used] = 0
    if width <= 15:  # exact in float64: one BLAS product
        return (digits.astype(np.float64) @ _FLOAT_PLACES[-width:]).astype(np.int64)
    return digits.astype(np.int64) @ _PLACES[-width:]


def _best(
    ids: np.ndarray, values: np.ndarray, widths: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per token, the ``k`` best by logprob, descending, ties in the server's order: the
    stable sort of the checked path (``sorted(..., reverse=True)``), for all tokens at once."""
    n = len(widths)
    wide = int(widths.max())
    if int(widths.min()) == wide:
        id_rows, value_rows = ids.reshape(n, wide), values.reshape(n, wide)
    else:  # some tokens carry the sampled token as a K+1st entry: pad the others, last
        short = np.flatnonzero(widths < wide)
        at = np.cumsum(widths)[short]  # where each short row ends in the flat arrays
        id_rows = np.insert(ids, at, 0).reshape(n, wide)
        value_rows = np.insert(values, at, -np.inf).reshape(n, wide)
    order = np.argsort(-value_rows, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(id_rows, order, 1), np.take_along_axis(value_rows, order, 1)


def fast_sample(choice: Any, position: int, k: int) -> Sample | None:
    """The sample of a well-formed choice, without per-alternative Python; None when unsure."""
    if type(choice) is not dict:
        return None
    lp = choice.get("logprobs")
    if type(lp) is not dict:
        return None
    tokens, token_lps = lp.get("tokens"), lp.get("token_logprobs")
    if type(tokens) is not list or type(token_lps) is not list or not tokens:
        return None
    if len(token_lps) != len(tokens) or not _numbers(token_lps):
        return None
    id_array = _key_ids(tokens)
    if id_array is None:
        return None
    ids = id_array.tolist()
    sent = choice.get("token_ids")
    if sent is not None and (
        type(sent) is not list or sent != ids or set(map(type, sent)) != {int}
    ):
        return None
    index, text, finish = (
        choice.get("index", position),
        choice.get("text"),
        choice.get("finish_reason"),
    )
    if type(index) is not int or not (text is None or type(text) is str):
        return None
    if not (finish is None or type(finish) is str):
        return None
    if k:
        tops = _fast_top_k(lp.get("top_logprobs"), len(ids), k)
        if tops is None:
            return None
        top_ids, top_lps = tops
    else:
        top_ids, top_lps = empty_rows(len(ids))
    return Sample(
        sample_index=index,
        response=text or "",
        finish_reason=finish,
        token_ids=ids,
        logprobs=token_lps,
        top_token_ids=top_ids,
        top_logprobs=top_lps,
    )


def empty_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-K arrays for K = 0: a row per token, no alternatives."""
    return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float64)
