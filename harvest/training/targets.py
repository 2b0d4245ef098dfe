"""Turn data records into per-position training targets, aligned with a causal LM's logits.

A record holds the prompt as the teacher tokenised it (``prompt_token_ids``), the sampled tokens
(``token_ids``) and, for each sampled token, the teacher's logprob of it and its top-K. The
student sees ``prompt_token_ids + token_ids``; its logits at position t predict the token at
t + 1, so the teacher's distribution for response token j goes to position ``P + j - 1``
(P = prompt length). Everything here works on numpy, one record batch at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from workers.answers.tail import LN2, tail_logprob

TARGET_COLUMNS = (
    "prompt_token_ids",
    "token_ids",
    "logprobs",
    "top_token_ids",
    "top_logprobs",
    "loss_mask",
    "tail_logprob",
)
__all__ = ["LN2", "TARGET_COLUMNS", "Example", "collate", "examples_from_batch", "tail_logprob"]


class MissingPromptIds(ValueError):
    """Records without ``prompt_token_ids``: training on them would need re-tokenising."""


def stored_tails(
    batch: pa.RecordBatch, t_off: np.ndarray, top_lps: np.ndarray, shard: str
) -> np.ndarray:
    """Per-token tail mass: the stored ``tail_logprob`` column (computed by the worker from the
    server's full-precision values) when the shard has one, else recomputed from the top-K
    columns as read (exact for float32 shards; float16 ones lose digits, see bench/README.md)."""
    if "tail_logprob" not in batch.schema.names or batch.column("tail_logprob").null_count:
        return tail_logprob(top_lps)
    off, values = _list(batch.column("tail_logprob"))
    if not np.array_equal(off, t_off):
        raise ValueError(f"{shard}: tail_logprob lists not as long as token_ids")
    return _flat(values).astype(np.float32)


@dataclass(slots=True)
class Example:
    """One record, truncated: its input ids and the targets for positions start .. start+n-1."""

    input_ids: np.ndarray  # int64 [S], S <= max_len
    start: int  # position of the first target (P - 1, or P when the prompt is empty)
    top_ids: np.ndarray  # int32 [n, K]
    top_logprobs: np.ndarray  # float32 [n, K]
    logprobs: np.ndarray  # float32 [n]
    tail_logprob: np.ndarray  # float32 [n]
    loss_mask: np.ndarray  # bool [n]
    meta: dict[str, Any] = field(default_factory=dict)
    truncated: int = 0  # trained target tokens cut off by max_len (counted, never silent)


def _list(column: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """A list column's offsets (from 0) and exactly the values they index, whatever its slice."""
    off = column.offsets.to_numpy()
    return off - off[0], column.values.slice(off[0], off[-1] - off[0])


def _flat(values: pa.Array) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False)


def examples_from_batch(
    batch: pa.RecordBatch, shard: str, max_len: int, meta_columns: Sequence[str] = ()
) -> list[Example]:
    """The records of ``batch`` (read from ``shard``) as truncated, aligned examples."""
    names = batch.schema.names
    prompts = batch.column("prompt_token_ids") if "prompt_token_ids" in names else None
    if prompts is None or prompts.null_count:
        raise MissingPromptIds(
            f"{shard}: records without prompt_token_ids (harvested before the teacher's prompt "
            "ids were recorded); training on them would need re-tokenising the prompts, so "
            "re-harvest them with this version"
        )
    p_off, p_val = _list(prompts)
    p_val = _flat(p_val).astype(np.int64)
    t_off, t_val = _list(batch.column("token_ids"))
    t_val = _flat(t_val).astype(np.int64)
    per_token = [_list(batch.column(c)) for c in ("logprobs", "top_token_ids", "top_logprobs")]
    if any(not np.array_equal(off, t_off) for off, _ in per_token):
        raise ValueError(f"{shard}: logprobs or top-K lists not as long as token_ids")
    lp_val = _flat(per_token[0][1]).astype(np.float32)
    k = per_token[1][1].type.list_size
    top_ids = _flat(per_token[1][1].flatten()).astype(np.int32).reshape(-1, k)
    top_lps = _flat(per_token[2][1].flatten()).astype(np.float32).reshape(-1, k)
    tails = stored_tails(batch, t_off, top_lps, shard)
    masks = batch.column("loss_mask") if "loss_mask" in names else None
    m_off, m_val = _list(masks) if masks is not None else (None, None)
    m_val = _flat(m_val).astype(bool) if m_val is not None else None
    m_set = _flat(masks.is_valid()) if masks is not None else np.zeros(len(batch), dtype=bool)
    metas = {name: batch.column(name).to_pylist() for name in meta_columns}

    out = []
    for i in range(len(batch)):
        prompt = p_val[p_off[i] : p_off[i + 1]]
        t0, t1 = int(t_off[i]), int(t_off[i + 1])
        seq = np.concatenate([prompt, t_val[t0:t1]])[:max_len]
        p, r = len(prompt), t1 - t0
        first = 0 if p else 1  # with no prompt, nothing predicts the first response token
        n = max(0, min(r, len(seq) - p) - first)
        lo, hi = t0 + first, t0 + first + n
        if m_set[i]:
            m0 = int(m_off[i])
            if int(m_off[i + 1]) - m0 != r:
                raise ValueError(f"{shard}: row {i} has a loss_mask not as long as its token_ids")
            mask = m_val[m0 + first : m0 + first + n]
            cut = int(m_val[m0 + first + n : m0 + r].sum())
        else:
            mask = np.ones(n, dtype=bool)
            cut = max(0, r - first - n)
        out.append(
            Example(
                input_ids=seq,
                start=p + first - 1,
                top_ids=top_ids[lo:hi],
                top_logprobs=top_lps[lo:hi],
                logprobs=lp_val[lo:hi],
                tail_logprob=tails[lo:hi],
                loss_mask=mask,
                meta={name: values[i] for name, values in metas.items()},
                truncated=cut,
            )
        )
    return out


def collate(examples: Sequence[Example], length: int, k: int, pad_id: int) -> dict[str, Any]:
    """Right-pad examples into [B, length] arrays. Outside the targets, values are pad_id / 0."""
    b = len(examples)
    batch: dict[str, Any] = {
        "input_ids": np.full((b, length), pad_id, dtype=np.int64),
        "attention_mask": np.zeros((b, length), dtype=np.int64),
        "loss_mask": np.zeros((b, length), dtype=bool),
        "top_ids": np.full((b, length, k), pad_id, dtype=np.int32),
        "top_logprobs": np.zeros((b, length, k), dtype=np.float32),
        "logprobs": np.zeros((b, length), dtype=np.float32),
        "tail_logprob": np.zeros((b, length), dtype=np.float32),
    }
    for row, ex in enumerate(examples):
        s, lo, hi = len(ex.input_ids), ex.start, ex.start + len(ex.loss_mask)
        batch["input_ids"][row, :s] = ex.input_ids
        batch["attention_mask"][row, :s] = 1
        batch["loss_mask"][row, lo:hi] = ex.loss_mask
        batch["top_ids"][row, lo:hi] = ex.top_ids
        batch["top_logprobs"][row, lo:hi] = ex.top_logprobs
        batch["logprobs"][row, lo:hi] = ex.logprobs
        batch["tail_logprob"][row, lo:hi] = ex.tail_logprob
    for name in examples[0].meta if examples else ():
        batch[name] = [ex.meta[name] for ex in examples]
    return batch
