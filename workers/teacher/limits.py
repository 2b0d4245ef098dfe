"""How many bytes an answer may have: a bound derived from the request, read up to and no more.

A broken (or hostile) server can send an endless body; read whole, it would exhaust a worker's
memory long before the request timeout. Every transport stops reading at ``reply_limit`` bytes
and raises ``InvalidResponse`` (retried like any wrong-shape answer, a failure row once the
attempts are spent).

The bound is generous, never tight: what a vLLM answer can hold for this request, several
times over. Per generated token it allows ``K + 2`` entries (the top-K, the sampled token, its
own logprob) of ``ENTRY_BYTES`` each (``"token_id:151643":-12.345678901234567,`` is ~40 bytes;
a text token escaped as ``\\uXXXX`` can be longer). The prompt's length in tokens is at most
the request's length in bytes (a token id takes at least two bytes in JSON, a text token at
least one byte), so the prompt's share scales with the request's bytes: its token ids are echoed
back (``return_token_ids``), and in score mode ``prompt_logprobs`` gives each prompt token
``K + 1`` entries of ``PROMPT_ENTRY_BYTES`` (logprob, rank and decoded text each).
"""

from __future__ import annotations

from schemas.requests import CompletionRequest
from workers.errors import InvalidResponse

OVERHEAD_BYTES = 1 << 20  # ids, usage, field names, an error message: far less in practice
ENTRY_BYTES = 128  # one top-K entry of a generated token, with room for its text
ID_BYTES = 16  # one echoed prompt token id
PROMPT_ENTRY_BYTES = 192  # one prompt_logprobs entry: {"id": {"logprob", "rank", "decoded_token"}}
TOKENIZE_LIMIT_PER_BYTE = 32  # /tokenize: ids (and optionally strings) for each request byte
HEALTH_LIMIT = 1 << 16  # /health and /v1/models: a status, a short model list


def completion_limit(request: CompletionRequest, request_bytes: int) -> int:
    """The most bytes a ``/v1/completions`` answer to ``request`` (sent as ``request_bytes``)
    may have."""
    per_prompt_token = ID_BYTES
    if request.scoring:  # prompt_logprobs: K + 1 entries per prompt token
        per_prompt_token += (request.k + 1) * PROMPT_ENTRY_BYTES
    per_choice = request.max_tokens * (request.k + 2) * ENTRY_BYTES
    per_choice += request_bytes * per_prompt_token
    return OVERHEAD_BYTES + request.n * per_choice


def tokenize_limit(request_bytes: int) -> int:
    """The most bytes a ``/tokenize`` answer may have."""
    return OVERHEAD_BYTES + request_bytes * TOKENIZE_LIMIT_PER_BYTE


def too_large(limit: int, *, declared: int | None = None) -> InvalidResponse:
    """The error for an answer cut off at ``limit`` bytes (or refused by its Content-Length)."""
    what = f"declares {declared} bytes" if declared is not None else "went on"
    return InvalidResponse(f"the answer {what}, past the {limit} bytes this request allows")
