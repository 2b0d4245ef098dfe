"""Score mode: the teacher scores given text (teacher forcing) instead of generating.

The scored sequence is sent as token ids to ``/v1/completions`` with ``max_tokens: 1`` and
vLLM's ``prompt_logprobs: K``; the one generated token is discarded. Which ids, and which of
them to train on (the loss mask), comes from the server's own tokenizer (``/tokenize``):

* prompt + response: ``tokenize(prompt) + tokenize(response, add_special_tokens=False)``. The
  two halves are tokenised apart, so the boundary is exact: no BPE merge ever spans it, and the
  mask is exactly the response's tokens. (Tokenising the joined text could merge the last
  prompt characters with the first response characters and blur the boundary.)
* chat: the whole conversation rendered by the chat template (``add_generation_prompt``
  false). Assistant turn i spans from the end of ``messages[:i]`` rendered with the generation
  prompt to the end of ``messages[:i+1]`` rendered without: its content and everything the
  template closes the turn with, so the end-of-turn token (ChatML's ``<|im_end|>``, what the
  student must learn to stop with) is trained on, and so is a separator the template writes
  after it (ChatML's newline). Every prefix must be a true prefix of the whole rendering, else
  the row is an ``InvalidInput`` failure (templates that rewrite earlier turns, e.g. dropping
  reasoning, cannot be scored turn by turn).

* ids (a row with ``token_ids``, e.g. another harvest's records): ``prompt_token_ids +
  token_ids`` exactly as given, nothing tokenised. The record keeps the row's split (its
  ``prompt_token_ids`` / ``token_ids``), sample index and loss mask; the teacher's logprobs
  and top-K are those of ``token_ids``, on the same positions as the row's own logprobs.

Ids rows need no tokenising, so they are sent several to a request (``read_batch``; the
client's ``score_batch``): vLLM answers a list of prompts with one choice per prompt, in order.

A text row's record holds, for every token after the first (the first has no logprob), its id, its
logprob, the teacher's top-K (exactly K, best first) and whether to train on it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.job import JobSpec
from schemas.requests import CompletionRequest
from schemas.wire import Answer, PromptRow, Sample
from workers.answers.fastparse import PROMPT_MARK, scan_prompts
from workers.errors import InvalidInput, InvalidResponse, MissingLogprobs

FINISH_REASON = "score"

# Posts a ``/tokenize`` body (without the model name) and returns its token ids.
Tokenize = Callable[[dict[str, Any]], Awaitable[list[int]]]


@dataclass(slots=True)
class Scored:
    """The sequence to score, which of its tokens to train on, and the response text."""

    ids: list[int]
    mask: list[bool | None]  # as long as ids (None: an ids row without a mask)
    response: str
    start: int = 1  # ids[:start] are the record's prompt_token_ids, the rest its token_ids
    sample_index: int = 0


def score_sampling(spec: JobSpec) -> dict[str, Any]:
    """What decides a score record's content (request ids hash it): one record per row."""
    return {"mode": "score", "n": 1, "logprobs": spec.sampling.logprobs}


def score_request(spec: JobSpec, row: PromptRow, sampling: dict[str, Any]) -> CompletionRequest:
    """The ``/v1/completions`` request; the ids to score are added once tokenised
    (``sequence``).

    The temperature shapes only the discarded token; it is passed so the preflight's mode probe
    (two temperatures) can show that prompt logprobs do not depend on it."""
    return CompletionRequest(
        mode="score",
        model=spec.teacher.model,
        max_tokens=1,
        n=1,
        temperature=row.overrides.get("temperature", spec.sampling.temperature),
        k=spec.sampling.logprobs,
        sampling=sampling,
    )


async def sequence(tokenize: Tokenize, row: PromptRow) -> Scored:
    """The row's ids as the teacher tokenises them, and the mask of the tokens to train on."""
    if given(row):
        return given_sequence(row)
    if row.messages is None:
        prompt = await tokenize({"prompt": row.prompt})
        response = await tokenize({"prompt": row.response, "add_special_tokens": False})
        if not prompt or not response:
            raise InvalidInput("the prompt or the response tokenises to no tokens")
        mask = [False] * len(prompt) + [True] * len(response)
        return Scored(prompt + response, mask, row.response or "")
    messages = row.messages
    full = await tokenize({"messages": messages, "add_generation_prompt": False})
    mask = [False] * len(full)
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = await tokenize({"messages": messages[:i], "add_generation_prompt": True})
        end = full
        if i < last:
            end = await tokenize({"messages": messages[: i + 1], "add_generation_prompt": False})
        _check_prefix(full, start, f"messages[:{i}] with the generation prompt")
        _check_prefix(full, end, f"messages[:{i + 1}]")
        if len(start) >= len(end):
            raise InvalidInput(f"assistant turn messages[{i}] renders to no tokens")
        mask[len(start) : len(end)] = [True] * (len(end) - len(start))
    if not any(mask[1:]):
        raise InvalidInput("no assistant token to score after the first token")
    response = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    return Scored(full, mask, response)


def given(row: PromptRow) -> bool:
    """An ids row: scored exactly as given, with no ``/tokenize`` call."""
    return row.token_ids is not None and row.prompt_token_ids is not None


def given_sequence(row: PromptRow) -> Scored:
    """An ids row's sequence: its ``prompt_token_ids + token_ids``, masked by its loss mask."""
    assert row.token_ids is not None and row.prompt_token_ids is not None
    prompt = list(row.prompt_token_ids)
    mask: list[bool | None] = [False] * len(prompt)
    mask += list(row.loss_mask) if row.loss_mask is not None else [None] * len(row.token_ids)
    return Scored(prompt + list(row.token_ids), mask, _text(row), len(prompt), row.sample_index)


def _text(row: PromptRow) -> str:
    """An ids row's response text, when its source kept one (the record's column is required)."""
    return row.response or ""


def _check_prefix(full: list[int], part: list[int], what: str) -> None:
    if full[: len(part)] != part:
        at = next(
            (j for j, (a, b) in enumerate(zip(full, part, strict=False)) if a != b), len(full)
        )
        raise InvalidInput(
            f"the chat template renders {what} differently from the start of the whole "
            f"conversation (first difference at token {at}), so the assistant turns cannot be "
            "located"
        )


def _num(v: Any) -> bool:
    return type(v) is float or type(v) is int


def _position(entry: Any, actual: int, k: int) -> tuple[float, list[int], list[float]]:
    """One ``prompt_logprobs`` entry: the actual token's logprob and exactly K alternatives.

    vLLM keys entries by token id and adds the actual token as a K+1st key when it is outside
    the top K; that key is then dropped from the alternatives, whatever its logprob ties with."""
    if type(entry) is not dict:
        raise InvalidResponse("a prompt_logprobs entry is not an object")
    if len(entry) < k:
        raise MissingLogprobs(f"teacher returned {len(entry)} prompt logprobs, asked for {k}")
    if len(entry) > k + 1:
        raise InvalidResponse(f"teacher returned {len(entry)} prompt logprobs, asked for {k}")
    alts: list[tuple[float, int]] = []
    own = None
    for key, value in entry.items():
        if type(key) is not str or not key.isdigit():
            raise InvalidResponse(f"prompt_logprobs key {str(key)[:40]!r} is not a token id")
        lp = value.get("logprob") if type(value) is dict else None
        if not _num(lp):
            raise InvalidResponse("a prompt logprob is not a number")
        tid = int(key)
        if tid == actual:
            own = float(lp)
            if len(entry) == k + 1:
                continue  # added beside the top K, not one of them
        alts.append((float(lp), tid))
    if own is None:
        raise InvalidResponse(f"prompt_logprobs entry lacks the scored token {actual}")
    alts.sort(key=lambda a: (-a[0], a[1]))
    return own, [t for _, t in alts], [lp for lp, _ in alts]


def read_batch(raw: bytes, batch: list[Scored], k: int) -> list[Answer]:
    """The answers to a request that scored ``batch`` (one sequence per prompt, in order), from
    the body's bytes: the prompt_logprobs are read by the compiled core
    (``fastparse.scan_prompts``) without a Python object per alternative; at any doubt the
    whole body goes through orjson and ``parse_batch``, which names the problem."""
    fast = scan_prompts(raw, [(s.ids, s.start) for s in batch], k)
    if fast is not None:
        body, rows = fast
        choices = _choices(body, batch)
        marks = [c.get("prompt_logprobs") for c in choices]
        if marks == [PROMPT_MARK + str(j) for j in range(len(batch))]:
            pairs = zip(batch, rows, strict=True)
            return [_answer(s, own, ids, lps) for s, (ids, lps, own) in pairs]
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidResponse(f"body is not JSON: {err}") from None
    return parse_batch(body, batch, k)


def read_scored(raw: bytes, scored: Scored, k: int) -> Answer:
    """``read_batch`` of an answer that scored one sequence."""
    return read_batch(raw, [scored], k)[0]


def _choices(body: Any, batch: list[Scored]) -> list[dict[str, Any]]:
    """The answer's choices, one per scored sequence in the order sent (vLLM gives prompt j the
    choice of index j), each echoing the ids it scored when it echoes any."""
    choices = body.get("choices") if type(body) is dict else None
    if type(choices) is not list or len(choices) != len(batch):
        raise InvalidResponse(f"response has not exactly {len(batch)} choice(s)")
    for j, (choice, scored) in enumerate(zip(choices, batch, strict=True)):
        if type(choice) is not dict or choice.get("index", j) != j:
            raise InvalidResponse(f"choice {j} is not an object of index {j}")
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and echoed != scored.ids:
            raise InvalidResponse("the teacher scored other token ids than were sent")
    return choices


def parse_batch(body: Any, batch: list[Scored], k: int) -> list[Answer]:
    """Parse a ``/v1/completions`` answer to a ``prompt_logprobs: k`` request for ``batch``."""
    return [
        _parse_choice(choice, scored, k)
        for choice, scored in zip(_choices(body, batch), batch, strict=True)
    ]


def parse_scored(body: Any, scored: Scored, k: int) -> Answer:
    """``parse_batch`` of an answer that scored one sequence."""
    return parse_batch(body, [scored], k)[0]


def _parse_choice(choice: dict[str, Any], scored: Scored, k: int) -> Answer:
    plp = choice.get("prompt_logprobs")
    if plp is None:
        raise MissingLogprobs("teacher returned no prompt_logprobs (a vLLM extra)")
    if type(plp) is not list or len(plp) != len(scored.ids):
        raise InvalidResponse("prompt_logprobs is not a list as long as the prompt")
    if plp[0] is not None:
        raise InvalidResponse("prompt_logprobs does not start with null (the first token)")
    start = scored.start
    logprobs, top_ids, top_lps = [], [], []
    for entry, actual in zip(plp[start:], scored.ids[start:], strict=True):
        own, ids, lps = _position(entry, actual, k)
        logprobs.append(own)
        top_ids.append(ids)
        top_lps.append(lps)
    return _answer(scored, logprobs, top_ids, top_lps)


def _answer(scored: Scored, logprobs: Any, top_ids: Any, top_lps: Any) -> Answer:
    start = scored.start
    mask = scored.mask[start:]
    sample = Sample(
        sample_index=scored.sample_index,
        response=scored.response,
        finish_reason=FINISH_REASON,
        token_ids=scored.ids[start:],
        logprobs=logprobs,
        top_token_ids=top_ids,
        top_logprobs=top_lps,
        loss_mask=None if mask and mask[0] is None else mask,  # type: ignore[arg-type]
    )
    return Answer([sample], start, scored.ids[:start])
