"""Turn vLLM's OpenAI-shaped JSON into columnar ``Sample`` values.

We ask vLLM for ``return_tokens_as_token_ids``, so every token (sampled or alternative) arrives as
``"token_id:<int>"``: records carry real ids, and two ids that decode to the same string never
collapse into one dict key. Top-K alternatives are sorted by logprob and cut to exactly K (vLLM
adds the sampled token as a K+1st entry when it is outside the top K).
"""

from __future__ import annotations

from typing import Any

from schemas.wire import Answer, Sample
from workers.errors import InvalidResponse, MissingLogprobs

_PREFIX = "token_id:"


def _token_id(token: Any) -> int:
    if isinstance(token, str) and token.startswith(_PREFIX):
        try:
            return int(token[len(_PREFIX) :])
        except ValueError:
            pass
    raise MissingLogprobs(
        f"teacher returned token {token!r}, not 'token_id:<n>' (does it support "
        "return_tokens_as_token_ids? vLLM does)"
    )


def _top_k(pairs: list[tuple[int, float]], k: int) -> tuple[list[int], list[float]]:
    if len(pairs) < k:
        raise MissingLogprobs(f"teacher returned {len(pairs)} top logprobs, asked for {k}")
    pairs.sort(key=lambda p: p[1], reverse=True)
    del pairs[k:]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _choices(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise InvalidResponse("response has no 'choices' list")
    return body["choices"]


def _prompt_tokens(body: dict[str, Any]) -> int | None:
    usage = body.get("usage")
    return usage.get("prompt_tokens") if isinstance(usage, dict) else None


def parse_completions(body: Any, k: int) -> Answer:
    """Parse a ``/v1/completions`` answer requested with ``logprobs: k``."""
    samples = []
    for choice in _choices(body):
        lp = choice.get("logprobs")
        if not isinstance(lp, dict) or lp.get("tokens") is None:
            raise MissingLogprobs("completion choice has no logprobs")
        tokens, token_lps = lp["tokens"], lp.get("token_logprobs") or []
        tops = lp.get("top_logprobs") or []
        if len(token_lps) != len(tokens) or (k and len(tops) != len(tokens)):
            raise InvalidResponse("logprobs arrays have different lengths")
        top_ids, top_lps = [], []
        if k:
            for entry in tops:
                if not isinstance(entry, dict):
                    raise MissingLogprobs("a token has no top_logprobs")
                ids, vals = _top_k([(_token_id(t), float(v)) for t, v in entry.items()], k)
                top_ids.append(ids)
                top_lps.append(vals)
        else:
            top_ids = top_lps = [[] for _ in tokens]
        samples.append(
            Sample(
                sample_index=int(choice.get("index", len(samples))),
                response=choice.get("text") or "",
                finish_reason=choice.get("finish_reason"),
                token_ids=[_token_id(t) for t in tokens],
                logprobs=[float(v) for v in token_lps],
                top_token_ids=top_ids,
                top_logprobs=top_lps,
            )
        )
    first = _choices(body)[0] if _choices(body) else {}
    prompt_ids = first.get("prompt_token_ids") if isinstance(first, dict) else None
    return Answer(samples, _prompt_tokens(body), prompt_ids)
