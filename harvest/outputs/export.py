"""``harvest export OUT DEST --format axolotl``: a harvest as axolotl's offline KD dataset.

axolotl's KD chat-template loader (``type: axolotl.integrations.kd.chat_template``, v2 layout)
reads per row ``messages``, ``logprobs`` ([rows, K] teacher logprobs) and ``target_token_ids``
([rows, K] ids). It re-tokenises ``messages`` with the model's chat template into S ids and
lays the R logprob rows on the *last* R positions (row i at position S - R + i, the teacher's
distribution for the token at that position; its trainer shifts for the causal LM). So the
export re-tokenises each record exactly as axolotl will, with the teacher's tokenizer, and
writes one row per position from the first response token to the end:

* the harvested ids must be a prefix of the re-tokenised ids (a sampled response that BPE
  re-tokenises differently, or a prompt rendered otherwise, would shift every target): a record
  that fails this is refused, with one line naming it and the first position that differs,
  never exported shifted;
* positions after the harvested tokens (the template's closing tokens, e.g. ``<|im_end|>\\n``
  after a response cut by ``max_tokens``) have no teacher distribution: they get uniform filler
  rows, and the axolotl config must not train on them (``train_on_eos: none``; the README's
  config does so). The test proves no filler row is ever a target.

Chat records become ``chat.jsonl`` (messages + the response as the assistant turn, the model's
own template). Plain-prompt (completions) records become ``completions.jsonl``: the prompt as
a ``user`` message and the response as the ``assistant`` one, read with the template written
beside it (``completions_template.jinja``: the two texts concatenated, the BOS token first when
the teacher's prompt ids start with it), so axolotl sees the very ids the teacher scored.
Score-mode records are exported the same way (their response is the scored text).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from harvest.training import reader
from workers.shards.columns import read_metadata
from workers.storage import PieceWriter, open_store

COMPLETIONS_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"  # prompt then response
)
FORMATS = ("axolotl",)
FILES = {"chat": "chat.jsonl", "completions": "completions.jsonl"}


class ExportError(ValueError):
    """The output cannot be exported at all (no tokenizer, unknown format, no records)."""


@dataclass
class ExportResult:
    """What an export wrote and what it refused (each refusal also printed as one line)."""

    written: Counter[str] = field(default_factory=Counter)  # per file kind
    refused: list[str] = field(default_factory=list)
    filler_rows: int = 0
    cut_targets: int = 0  # response tokens after a re-tokenisation difference, not exported
    files: list[str] = field(default_factory=list)


def load_tokenizer(out: str, tokenizer: str | None) -> Any:
    """The teacher's tokenizer: ``tokenizer`` if given, else the shards' recorded model root."""
    from transformers import AutoTokenizer

    where = tokenizer
    if where is None:
        files = reader.data_files(out)
        if not files:
            raise ExportError(f"{out}: no committed data shards to export")
        where = (read_metadata(files[0]).get("teacher") or {}).get("model_root")
    if not where:
        raise ExportError("the shards record no model_root; pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(where)
    except OSError as err:
        raise ExportError(f"cannot load the teacher's tokenizer from {where}: {err}") from err


def completions_template(bos: str | None) -> str:
    return ("{{ bos_token }}" if bos else "") + COMPLETIONS_TEMPLATE


def export_axolotl(
    out: str,
    dest: str,
    tokenizer: Any,
    *,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> ExportResult:
    """Write ``out``'s committed records under ``dest`` (folder or URI) for axolotl's KD path."""
    dataset = reader.dataset(out, "data")
    k = dataset.schema.field("top_token_ids").type.value_type.list_size
    if not k:
        raise ExportError("a top-0 harvest has no logprob rows to distil from")
    store = open_store(dest)
    sinks: dict[str, PieceWriter] = {}  # opened in the try: one that fails aborts the others
    result = ExportResult()
    filler_ids, filler_lps = list(range(k)), [-math.log(k)] * k
    bos_id = tokenizer.bos_token_id
    template = None  # decided by the first completions record
    cols = ["request_id", "api", "prompt", "messages", "response", "prompt_token_ids"]
    cols += ["token_ids", "top_token_ids", "top_logprobs"]
    try:
        for kind, name in FILES.items():
            sinks[kind] = store.open_stream(name)
        for batch in dataset.to_batches(columns=cols, batch_size=256):
            for rec in batch.to_pylist():
                kind = "chat" if rec["api"] == "chat" else "completions"
                if kind == "completions" and template is None:
                    first = (rec["prompt_token_ids"] or [None])[0]
                    starts = bos_id is not None and first == bos_id
                    template = completions_template(tokenizer.bos_token if starts else None)
                got = _aligned(rec, tokenizer, template)
                if isinstance(got, str):
                    result.refused.append(rec["request_id"])
                    say(f"refused {rec['request_id']}: {got}; exporting it would shift its targets")
                    continue
                messages, ids, m = got
                result.cut_targets += len(rec["token_ids"]) - m - 1
                p = len(rec["prompt_token_ids"])
                filler = len(ids) - p - m  # rows at P-1 .. S-1: top_0..top_m, then fillers
                row = {
                    "messages": messages,
                    "logprobs": [*rec["top_logprobs"][: m + 1], *([filler_lps] * filler)],
                    "target_token_ids": [*rec["top_token_ids"][: m + 1], *([filler_ids] * filler)],
                }
                sinks[kind].write(orjson.dumps(row) + b"\n")
                result.written[kind] += 1
                result.filler_rows += filler
        for sink in sinks.values():
            sink.close()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    if template is not None:
        store.write_bytes("completions_template.jinja", template.encode())
    store.write_bytes("axolotl_datasets.yaml", datasets_yaml(dest, template).encode())
    result.files = [*FILES.values(), "axolotl_datasets.yaml"]
    return result


def _render(rec: dict[str, Any], response: str, tokenizer: Any, template: str | None) -> tuple:
    """The messages axolotl gets for ``rec`` with ``response`` and the ids it will train on."""
    if rec["api"] == "chat":
        messages = [*rec["messages"], {"role": "assistant", "content": response}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
    else:
        messages = [
            {"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": response},
        ]
        ids = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True)
    return messages, list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _aligned(rec: dict[str, Any], tokenizer: Any, template: str | None) -> tuple | str:
    """(messages, ids, j): the record as axolotl will tokenise it, its first ``j`` response
    tokens exactly where the teacher had them; or why no response token can be kept.

    A sampled response may re-tokenise differently (BPE has one canonical split, a sampler
    does not follow it): then the response is cut before the first token that differs, at
    the longest prefix whose text re-tokenises to exactly the harvested ids. Cut targets are
    counted, never shifted."""
    prompt = rec["prompt_token_ids"] or []
    tokens = rec["token_ids"]
    if not prompt:
        return "no prompt ids"
    _, ids = _render(rec, rec["response"], tokenizer, template)
    if ids[: len(prompt)] != prompt:
        return _mismatch(ids, prompt + tokens, len(prompt)) or "prompt renders differently"
    agree = 0
    while agree < len(tokens) and len(prompt) + agree < len(ids):
        if ids[len(prompt) + agree] != tokens[agree]:
            break
        agree += 1
    for m in range(min(agree, len(tokens) - 1), 0, -1):
        text = tokenizer.decode(tokens[:m], skip_special_tokens=False)
        messages, ids = _render(rec, text, tokenizer, template)
        if ids[: len(prompt) + m] == prompt + tokens[:m]:
            return messages, ids, m
    return "fewer than 2 response tokens re-tokenise as harvested"


def _mismatch(ids: list[int], harvested: list[int], p: int) -> str | None:
    """Why ``ids`` (axolotl's re-tokenisation) cannot carry the harvested rows unshifted."""
    if len(harvested) <= p:
        return "no response tokens"
    if len(ids) < len(harvested):
        return f"re-tokenised to {len(ids)} ids, fewer than the {len(harvested)} harvested"
    for pos, (a, b) in enumerate(zip(ids, harvested, strict=False)):
        if a != b:
            where = "prompt" if pos < p else "response"
            return f"re-tokenised ids differ from the harvested ones at position {pos} ({where})"
    return None


def datasets_yaml(dest: str, template: str | None) -> str:
    """The ``datasets:`` entries of an axolotl config that read this export."""
    common = (
        "    type: axolotl.integrations.kd.chat_template\n"
        "    field_messages: messages\n"
        "    logprobs_field: logprobs\n"
        "    roles_to_train: [assistant]\n"
        "    train_on_eos: none\n"
    )
    text = f"datasets:\n  - path: {dest.rstrip('/')}/chat.jsonl\n    ds_type: json\n{common}"
    if template is not None:
        text += (
            f"  - path: {dest.rstrip('/')}/completions.jsonl\n    ds_type: json\n{common}"
            "    chat_template: jinja\n"
            f"    chat_template_jinja: {orjson.dumps(template).decode()}\n"
        )
    return text
