"""Score-mode rows that carry token ids: scored exactly as given, never re-tokenised.

A row with ``token_ids`` (and ``prompt_token_ids``) is scored on those ids: tokenisation is not
unique, so decoding a student's sampled ids and tokenising the text again can give other ids,
and the teacher would then score tokens the student never sampled. Such rows are what a
harvest writes (``input.format: harvest`` reads another harvest's committed data shards), or
JSONL / Parquet rows with the same columns. Besides the ids, a row may carry (as a harvest
record does) ``request_id``, ``prompt_id``, ``sample_index``, ``loss_mask`` and ``logprobs``
(the source's own logprob of each token: the student's, which the record keeps as
``student_logprobs``); ``prompt`` / ``messages`` text is kept when present.
"""

from __future__ import annotations

from typing import Any

from schemas.wire import PromptRow, RowProblem

IDS_FIELD = "token_ids"
PROMPT_IDS_FIELD = "prompt_token_ids"
# What ``input.format: harvest`` reads of a data shard (its top-K are not read at all).
HARVEST_COLUMNS = (
    "request_id", "prompt_id", "sample_index", "prompt", "messages", "response",
    PROMPT_IDS_FIELD, IDS_FIELD, "loss_mask", "logprobs",
)  # fmt: skip


def carries_ids(obj: dict[str, Any]) -> bool:
    return obj.get(IDS_FIELD) is not None or obj.get(PROMPT_IDS_FIELD) is not None


def dup_key(row: PromptRow | RowProblem) -> str:
    """What must be unique in the input: the source record (an ids row) or the prompt id."""
    if row.request_id is not None:
        return "request_id " + row.request_id
    if (isinstance(row, PromptRow) and row.token_ids is not None) or row.sample_index:
        return f"{row.prompt_id} sample {row.sample_index}"
    return row.prompt_id


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def ids_row(
    obj: dict[str, Any],
    pid: str,
    source: str,
    raw: str,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
) -> PromptRow | RowProblem:
    """The checked ids row, or the problem that makes it a failure record."""
    if isinstance(obj.get("prompt_id"), str):  # a harvest record names its prompt so
        pid = obj["prompt_id"]
    rid = obj.get("request_id")
    rid = rid if isinstance(rid, str) and rid else None
    index = obj.get("sample_index")
    index = index if type(index) is int and index >= 0 else 0

    def bad(reason: str) -> RowProblem:
        return RowProblem(pid, source, f"score mode: {reason}", raw, index, rid)

    ids, prompt_ids = obj.get(IDS_FIELD), obj.get(PROMPT_IDS_FIELD)
    if not _ints(prompt_ids) or not prompt_ids:
        return bad(f"'{PROMPT_IDS_FIELD}' must be a non-empty list of token ids")
    if not _ints(ids) or not ids:
        return bad(f"'{IDS_FIELD}' must be a non-empty list of token ids")
    mask, lps = obj.get("loss_mask"), obj.get("logprobs")
    if mask is not None and (
        not isinstance(mask, list)
        or len(mask) != len(ids)
        or not all(type(m) is bool for m in mask)
    ):
        return bad(f"'loss_mask' must be a list of booleans as long as '{IDS_FIELD}'")
    if lps is not None:
        if not isinstance(lps, list) or len(lps) != len(ids):
            return bad(f"'logprobs' must be a list of numbers as long as '{IDS_FIELD}'")
        if not all(type(v) in (float, int) for v in lps):
            return bad("'logprobs' must hold numbers only")
        lps = [float(v) for v in lps]
    response = obj.get("response")
    return PromptRow(
        pid, source, prompt=prompt, messages=messages, prompt_token_ids=prompt_ids,
        token_ids=ids, loss_mask=mask, student_logprobs=lps, request_id=rid, sample_index=index,
        response=response if isinstance(response, str) else None,
    )  # fmt: skip
