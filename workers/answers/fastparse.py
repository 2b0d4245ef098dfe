"""The fast path of ``workers.answers.parse``: a whole choice without per-alternative Python.

Speed: a 256-token top-20 answer holds ~5,000 alternatives, so per-alternative Python calls
dominated a worker's CPU. ``fast_sample`` checks a whole choice at once; the alternatives'
ids and logprobs go into (tokens, K) int64 / float64 arrays, best K first, by the compiled
``workers.answers._topk`` (~0.1 ms per answer) or, where the package was installed without a C
compiler, by numpy passes over the joined keys and one stable argsort (~1.1 ms). It gives up
(``None``) at the first doubt; the per-token checked path (``workers.answers.parse``) then decides
and names the problem. The fast path accepts only answers the checked path accepts, and returns the
same values for them (tests/workers/test_parse.py compares both, with and without the compiled
core, on real answers and random edits of them).

``scan`` goes one step further: the compiled core reads every top_logprobs array straight from
the body's bytes (numbers converted exactly as orjson converts them), so orjson only builds the
~10 % of the body that is not top-K; ``parse.read_completions`` uses it and, at any doubt,
parses the whole body again the ordinary way (tests/workers/test_fastscan.py).
"""

from __future__ import annotations

from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import orjson

from schemas.wire import Sample

try:  # built by ``pip install`` when a C compiler is there; the numpy passes below otherwise
    from workers.answers import _topk as compiled
except ImportError:  # pragma: no cover - depends on the machine that installed the package
    compiled = None

PREFIX = "token_id:"
_CUT = len(PREFIX)
MAX_DIGITS = 18  # any vocabulary id fits; int64 still holds it
_NUMBER_TYPES = frozenset((float, int))


def _numbers(values: Any) -> bool:
    return set(map(type, values)) <= _NUMBER_TYPES


def _fast_top_k(tops: Any, n: int, k: int) -> tuple[Any, Any] | None:
    """Top ``k`` ids (int64) and logprobs (float64) per token as (n, k) arrays, best first;
    None unless every entry is a dict of K or K+1 ``token_id:N`` -> float pairs."""
    if type(tops) is not list or len(tops) != n:
        return None
    if compiled is not None:
        ids, lps = np.empty((n, k), np.int64), np.empty((n, k), np.float64)
        return (ids, lps) if compiled.fill_top_k(tops, k, ids, lps) else None
    if set(map(type, tops)) != {dict}:
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
    logprobs = np.array(values, np.float64)
    if np.isnan(logprobs).any():  # no order to agree on (orjson never builds NaN; a dict may)
        return None
    return _best(ids, logprobs, widths, k)


_PREFIX_BYTES = PREFIX.encode()
_NEXT = b"\n" + _PREFIX_BYTES
_PLACES = 10 ** np.arange(MAX_DIGITS - 1, -1, -1, dtype=np.int64)
_FLOAT_PLACES = _PLACES.astype(np.float64)


def _key_ids(keys: list[str]) -> np.ndarray | None:
    """The ids of ``token_id:N`` strings in a few numpy passes over their joined bytes; None
    unless every one is exactly the prefix and 1-18 ASCII digits (what ``_token_id`` takes,
    with the same value: leading zeros included)."""
    if compiled is not None:
        out = np.empty(len(keys), np.int64)
        return out if compiled.fill_key_ids(keys, out) else None
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


TopRows = tuple[np.ndarray, np.ndarray]  # (tokens, K) ids and logprobs, best first


class Scanned(NamedTuple):
    """A body whose top_logprobs arrays were read from its bytes (``scan``)."""

    body: Any  # the JSON, each array read replaced by the string "\x00<i>"
    tops: list[TopRows]  # the i-th array read


_MARK = "\x00"
_MARK_ESCAPED = b"\\u0000"


def scan(raw: bytes, k: int) -> Scanned | None:
    """The body with its top-K read straight from the bytes by the compiled core: no Python
    object per alternative is ever built (orjson reads the rest, ~10 % of a top-20 body).
    None when the core is missing, K is 0, the body could hold a forged marker (any NUL,
    escaped or not), or any array is not surely read as orjson and ``_fast_top_k`` would."""
    if compiled is None or not k or _MARK_ESCAPED in raw or b"\0" in raw:
        return None
    got = compiled.scan_top_k(raw, k)
    if got is None:
        return None
    stripped, ids, lps, rows = got
    try:
        body = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return None
    id_rows = np.frombuffer(ids, np.int64).reshape(-1, k)
    lp_rows = np.frombuffer(lps, np.float64).reshape(-1, k)
    ends = np.cumsum(rows).tolist()
    starts = [0, *ends[:-1]]
    tops = [(id_rows[a:b], lp_rows[a:b]) for a, b in zip(starts, ends, strict=True)]
    return Scanned(body, tops)


def _scanned_top_k(tops: Any, n: int, scanned: list[TopRows]) -> TopRows | None:
    """The rows ``scan`` read for this choice's marker, if they are one per token."""
    if type(tops) is not str or not tops.startswith(_MARK):
        return None
    ids, lps = scanned[int(tops[1:])]
    return (ids, lps) if len(ids) == n else None


def fast_sample(
    choice: Any, position: int, k: int, scanned: list[TopRows] | None = None
) -> Sample | None:
    """The sample of a well-formed choice, without per-alternative Python; None when unsure.
    With ``scanned`` (``Scanned.tops``), a marker in top_logprobs stands for rows read there."""
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
        raw_tops = lp.get("top_logprobs")
        if scanned is not None and type(raw_tops) is str:
            tops = _scanned_top_k(raw_tops, len(ids), scanned)
        else:
            tops = _fast_top_k(raw_tops, len(ids), k)
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


PROMPT_MARK = _MARK + "p"  # + the sequence's index: "\x00p0", "\x00p1", ...

ScoreRows = tuple[np.ndarray, np.ndarray, np.ndarray]  # top-K ids, top-K logprobs, own logprobs


def scan_prompts(
    raw: bytes, sequences: list[tuple[list[int], int]], k: int
) -> tuple[Any, list[ScoreRows]] | None:
    """A score answer's ``prompt_logprobs`` arrays, one per (ids, start) sequence, read from the
    bytes by the compiled core: the j-th array met in the body is read against the j-th
    sequence.

    Returns the body (the j-th array replaced by the marker string ``PROMPT_MARK + str(j)``)
    and per sequence the top-K ids and logprobs (n, K) and the actual tokens' logprobs (n) of
    its positions ``start..``. None when the core is missing, the body holds another number of
    arrays, or anything is not surely read as ``workers.teacher.score.parse_scored`` would read
    it (the caller then uses that). The body is not searched for a forged marker here (``scan``
    does): the core gives up on any escaped NUL in any string it passes, and on a
    "prompt_logprobs" value that is not an array."""
    if compiled is None:
        return None
    ids = np.fromiter(chain.from_iterable(s for s, _ in sequences), np.int64)
    lengths = np.array([len(s) for s, _ in sequences], np.int64)
    starts = np.array([start for _, start in sequences], np.int64)
    got = compiled.scan_prompt_logprobs(raw, k, ids, lengths, starts)
    if got is None:
        return None
    stripped, top_ids, top_lps, own = got
    try:
        body = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return None
    counts = (lengths - starts).tolist()  # scored positions per sequence
    id_rows = np.frombuffer(top_ids, np.int64).reshape(sum(counts), k)
    lp_rows = np.frombuffer(top_lps, np.float64).reshape(sum(counts), k)
    owns = np.frombuffer(own, np.float64)
    rows, at = [], 0
    for n in counts:
        rows.append((id_rows[at : at + n], lp_rows[at : at + n], owns[at : at + n]))
        at += n
    return body, rows


def scan_prompt(
    raw: bytes, ids: list[int], start: int, k: int
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray] | None:
    """``scan_prompts`` for an answer of one sequence: the body (its array replaced by
    ``PROMPT_MARK + "0"``), then the top-K ids, top-K logprobs and own logprobs."""
    got = scan_prompts(raw, [(ids, start)], k)
    if got is None:
        return None
    body, [(top_ids, top_lps, own)] = got
    return body, top_ids, top_lps, own
