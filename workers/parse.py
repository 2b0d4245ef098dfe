"""Turn vLLM's ``/v1/completions`` JSON into columnar ``Sample`` values, trusting nothing.

We ask vLLM for ``return_tokens_as_token_ids`` (every token, sampled or alternative, arrives as
``"token_id:<int>"``, so two ids that decode to the same string never collapse into one key) and
``return_token_ids`` (each choice carries the ``prompt_token_ids`` the teacher saw). Top-K
alternatives are sorted by logprob and cut to exactly K: vLLM adds the sampled token as a K+1st
entry when it is outside the top K.

Speed: a 256-token top-20 answer holds ~5,000 alternatives, so per-alternative Python calls
dominated a worker's CPU. ``_fast_sample`` checks a whole choice with C-level passes: types by
``set(map(type, ...))``, all alternatives' ids from their joined bytes in a few numpy passes,
their logprobs as one float64 array, and the best K of every token by one stable argsort. Top-K
arrives as (tokens, K) int64 / float64 arrays. It gives up (``None``) at the first doubt; the
per-token checked path below then decides, and raises the same errors as ever. The fast path
accepts only answers the checked path accepts, and returns the same values for them
(tests/workers/test_parse.py compares both, on real answers and random edits of them).

Two kinds of bad 200s, two actions:

* ``MissingLogprobs`` (a row error, no retry): the teacher answered but without what we asked
  for at all - no ``logprobs``, tokens not in ``token_id:N`` form, fewer than K alternatives, no
  prompt ids. Asking again gets the same answer.
* ``InvalidResponse`` (retried): anything else of the wrong shape - a ``null`` logprob, a
  non-dict alternatives entry, wrong types, lengths that disagree. Nothing else may escape: a
  ``TypeError`` from one odd answer once aborted a whole job.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np
import orjson

from schemas.wire import Answer, Sample
from workers.errors import InvalidResponse, MissingLogprobs

_PREFIX = "token_id:"
_CUT = len(_PREFIX)


def _is_num(v: Any) -> bool:
    t = type(v)
    return t is float or t is int  # bool is neither (type(True) is bool)


def _token_id(token: Any) -> int:
    if type(token) is not str:
        raise InvalidResponse(f"token {token!r} is not a string")
    if not token.startswith(_PREFIX):
        raise MissingLogprobs(
            f"teacher returned token {token[:40]!r}, not 'token_id:<n>' (does it support "
            "return_tokens_as_token_ids? vLLM does)"
        )
    tail = token[_CUT:]
    # ASCII digits only: no sign, spaces, underscores, other scripts' digits or 4,300-digit
    # numbers (``int`` raises ValueError for both, which must never escape the parser).
    if not (tail.isascii() and tail.isdigit()) or len(tail) > _MAX_DIGITS:
        raise InvalidResponse(f"token {token[:40]!r} has no integer id")
    return int(tail)


_MAX_DIGITS = 18  # any vocabulary id fits; int64 still holds it
_NUMBER_TYPES = frozenset((float, int))


def _ids_fast(tokens: list[Any]) -> list[int] | None:
    """The ids of ``token_id:N`` strings in a few C passes, or None if any is not exactly that.

    ``token_id:1\ntoken_id:22`` becomes the JSON ``[1,22]``; digits only, one field per token,
    no leading zeros (JSON refuses them), at most ``_MAX_DIGITS`` each."""
    try:
        joined = "\n".join(tokens)
    except TypeError:  # a non-string
        return None
    if not joined.startswith(_PREFIX):
        return None
    fields = joined[_CUT:].replace("\ntoken_id:", ",")
    if fields.count(",") != len(tokens) - 1:
        return None
    digits = fields.replace(",", "")
    if not (digits.isascii() and digits.isdigit()):
        return None
    try:
        ids = orjson.loads(f"[{fields}]")
    except orjson.JSONDecodeError:
        return None
    return ids if max(ids) < 10**_MAX_DIGITS else None


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


_DIGITS = 18  # as _MAX_DIGITS: any vocabulary id, and int64 holds it
_PREFIX_BYTES = _PREFIX.encode()
_NEXT = b"\n" + _PREFIX_BYTES
_PLACES = 10 ** np.arange(_DIGITS - 1, -1, -1, dtype=np.int64)
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
    if lengths.min() < 1 or width > _DIGITS:
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
        starts = np.zeros(n, np.int64)
        np.cumsum(widths[:-1], out=starts[1:])
        rows = np.repeat(np.arange(n), widths)
        cols = np.arange(len(ids)) - np.repeat(starts, widths)
        id_rows = np.zeros((n, wide), np.int64)
        value_rows = np.full((n, wide), -np.inf)
        id_rows[rows, cols] = ids
        value_rows[rows, cols] = values
    order = np.argsort(-value_rows, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(id_rows, order, 1), np.take_along_axis(value_rows, order, 1)


def _fast_sample(choice: Any, position: int, k: int) -> Sample | None:
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
    ids = _ids_fast(tokens)
    if ids is None:
        return None
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
        top_ids, top_lps = _empty_rows(len(ids))
    return Sample(
        sample_index=index,
        response=text or "",
        finish_reason=finish,
        token_ids=ids,
        logprobs=token_lps,
        top_token_ids=top_ids,
        top_logprobs=top_lps,
    )


def _empty_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-K arrays for K = 0: a row per token, no alternatives."""
    return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float64)


def _int_list(value: Any, what: str) -> list[int]:
    if type(value) is not list or not all(type(v) is int for v in value):
        raise InvalidResponse(f"{what} is not a list of integers")
    return value


def _top_k(tops: Any, n: int, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Exactly ``k`` (id, logprob) per token, best first."""
    if tops is None:
        raise MissingLogprobs(f"teacher returned no top_logprobs, asked for {k}")
    if type(tops) is not list or len(tops) != n:
        raise InvalidResponse("top_logprobs is not a list as long as tokens")
    top_ids, top_lps = [], []
    for entry in tops:
        if type(entry) is not dict:
            raise InvalidResponse(f"a top_logprobs entry is {type(entry).__name__}, not an object")
        if len(entry) < k:
            raise MissingLogprobs(f"teacher returned {len(entry)} top logprobs, asked for {k}")
        if len(entry) > k + 1:
            raise InvalidResponse(f"teacher returned {len(entry)} top logprobs, asked for {k}")
        if not all(map(_is_num, entry.values())):
            raise InvalidResponse("a top logprob is not a number")
        best = sorted(entry.items(), key=_by_logprob, reverse=True)[:k]
        top_ids.append([_token_id(t) for t, _ in best])
        top_lps.append([v for _, v in best])
    return top_ids, top_lps


def _by_logprob(item: tuple[str, float]) -> float:
    return item[1]


def _sample(choice: Any, position: int, k: int) -> Sample:
    fast = _fast_sample(choice, position, k)
    return fast if fast is not None else _checked_sample(choice, position, k)


def _checked_sample(choice: Any, position: int, k: int) -> Sample:
    """Token by token, naming the first thing wrong (the reference the fast path must match)."""
    if type(choice) is not dict:
        raise InvalidResponse("a choice is not an object")
    lp = choice.get("logprobs")
    if lp is None:
        raise MissingLogprobs("completion choice has no logprobs")
    if type(lp) is not dict:
        raise InvalidResponse("choice.logprobs is not an object")
    tokens = lp.get("tokens")
    if tokens is None:
        raise MissingLogprobs("completion choice has no logprobs.tokens")
    token_lps = lp.get("token_logprobs")
    if type(tokens) is not list or type(token_lps) is not list:
        raise InvalidResponse("logprobs.tokens / token_logprobs are not lists")
    if len(token_lps) != len(tokens):
        raise InvalidResponse("tokens and token_logprobs have different lengths")
    if not all(map(_is_num, token_lps)):
        raise InvalidResponse("a token logprob is not a number")
    ids = [_token_id(t) for t in tokens]
    sent_ids = choice.get("token_ids")
    if sent_ids is not None and _int_list(sent_ids, "choice.token_ids") != ids:
        raise InvalidResponse("choice.token_ids disagree with logprobs.tokens")
    if k:
        id_lists, lp_lists = _top_k(lp.get("top_logprobs"), len(ids), k)
        top_ids, top_lps = np.array(id_lists, np.int64), np.array(lp_lists, np.float64)
    else:
        top_ids, top_lps = _empty_rows(len(ids))
    index = choice.get("index", position)
    text, finish = choice.get("text"), choice.get("finish_reason")
    if type(index) is not int or not (text is None or type(text) is str):
        raise InvalidResponse("choice.index / choice.text have the wrong type")
    if not (finish is None or type(finish) is str):
        raise InvalidResponse("choice.finish_reason is not a string")
    return Sample(
        sample_index=index,
        response=text or "",
        finish_reason=finish,
        token_ids=ids,
        logprobs=token_lps,
        top_token_ids=top_ids,
        top_logprobs=top_lps,
    )


def _prompt_ids(choices: list[dict[str, Any]]) -> list[int]:
    """The prompt as the teacher tokenised it; every choice must carry the same ids."""
    first = choices[0].get("prompt_token_ids")
    if first is None:
        raise MissingLogprobs("teacher returned no prompt_token_ids (return_token_ids)")
    ids = _int_list(first, "prompt_token_ids")
    for choice in choices[1:]:
        if choice.get("prompt_token_ids") != ids:
            raise InvalidResponse("choices disagree on prompt_token_ids")
    return ids


def _prompt_tokens(body: dict[str, Any], ids: list[int]) -> int:
    usage = body.get("usage")
    count = usage.get("prompt_tokens") if type(usage) is dict else None
    if count is None:
        return len(ids)
    if type(count) is not int or count != len(ids):
        raise InvalidResponse(f"usage.prompt_tokens {count!r} != {len(ids)} prompt_token_ids")
    return count


def parse_completions(body: Any, k: int) -> Answer:
    """Parse a ``/v1/completions`` answer requested with ``logprobs: k`` and token ids on."""
    choices = body.get("choices") if type(body) is dict else None
    if type(choices) is not list or not choices:
        raise InvalidResponse("response has no 'choices' list")
    samples = [_sample(c, i, k) for i, c in enumerate(choices)]
    if sorted(s.sample_index for s in samples) != list(range(len(samples))):
        raise InvalidResponse("choice indexes are not 0..n-1")
    samples.sort(key=lambda s: s.sample_index)
    ids = _prompt_ids(choices)
    return Answer(samples, _prompt_tokens(body, ids), ids)
