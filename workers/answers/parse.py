"""Turn vLLM's ``/v1/completions`` JSON into columnar ``Sample`` values, trusting nothing.

We ask vLLM for ``return_tokens_as_token_ids`` (every token, sampled or alternative, arrives as
``"token_id:<int>"``, so two ids that decode to the same string never collapse into one key) and
``return_token_ids`` (each choice carries the ``prompt_token_ids`` the teacher saw). Top-K
alternatives are sorted by logprob and cut to exactly K: vLLM adds the sampled token as a K+1st
entry when it is outside the top K.

The fast path lives in ``workers.answers.fastparse``; this module is the reference it must match.

Two kinds of bad 200s, two actions:

* ``MissingLogprobs`` (a row error, no retry): the teacher answered but without what we asked
  for at all - no ``logprobs``, tokens not in ``token_id:N`` form, fewer than K alternatives, no
  prompt ids. Asking again gets the same answer.
* ``InvalidResponse`` (retried): anything else of the wrong shape - a ``null`` logprob, a
  non-dict alternatives entry, wrong types, lengths that disagree. Nothing else may escape: a
  ``TypeError`` from one odd answer once aborted a whole job.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from schemas.wire import Answer, Sample
from workers.answers.fastparse import MAX_DIGITS, PREFIX, TopRows, empty_rows, fast_sample, scan
from workers.errors import InvalidResponse, MissingLogprobs

_PREFIX, _CUT = PREFIX, len(PREFIX)


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
    if not (tail.isascii() and tail.isdigit()) or len(tail) > MAX_DIGITS:
        raise InvalidResponse(f"token {token[:40]!r} has no integer id")
    return int(tail)


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


def _sample(choice: Any, position: int, k: int, scanned: list[TopRows] | None = None) -> Sample:
    fast = fast_sample(choice, position, k, scanned)
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
        top_ids, top_lps = empty_rows(len(ids))
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


def read_completions(raw: bytes, k: int) -> Answer:
    """``parse_completions`` of a body's bytes, with its top-K read straight from them when the
    compiled core can (``fastparse.scan``). At any doubt or error there, the whole body is
    parsed again the ordinary way: both ways give the same answer or the same error."""
    scanned = scan(raw, k)
    if scanned is not None:
        try:
            return parse_completions(scanned.body, k, scanned.tops)
        except (InvalidResponse, MissingLogprobs):
            pass
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidResponse(f"body is not JSON: {err}") from err
    return parse_completions(body, k)


def parse_completions(body: Any, k: int, scanned: list[TopRows] | None = None) -> Answer:
    """Parse a ``/v1/completions`` answer requested with ``logprobs: k`` and token ids on
    (``scanned``: the top-K rows ``fastparse.scan`` read, for its markers in ``body``)."""
    choices = body.get("choices") if type(body) is dict else None
    if type(choices) is not list or not choices:
        raise InvalidResponse("response has no 'choices' list")
    samples = [_sample(c, i, k, scanned) for i, c in enumerate(choices)]
    if sorted(s.sample_index for s in samples) != list(range(len(samples))):
        raise InvalidResponse("choice indexes are not 0..n-1")
    samples.sort(key=lambda s: s.sample_index)
    ids = _prompt_ids(choices)
    return Answer(samples, _prompt_tokens(body, ids), ids)
