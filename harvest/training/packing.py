"""Packed batches: several sequences per row, up to ``max_len`` tokens, for varlen attention.

Each packed row holds whole sequences one after another. ``position_ids`` restart at 0 at each
sequence, and ``cu_seqlens`` (int32, the cumulative sequence starts flash-attention's varlen
kernels take: ``[0, len_0, len_0 + len_1, ..., row_length]``) marks the boundaries. A target
sits at the positions of its own sequence only: its last one predicts that sequence's last
token, so none crosses a boundary (attention must be block-diagonal by ``cu_seqlens``: a
sequence attends to itself only).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from harvest.training.targets import Example


def pack_rows(
    examples: Iterable[Example], batch_size: int, max_len: int
) -> Iterator[list[list[Example]]]:
    """Group examples into batches of ``batch_size`` rows of at most ``max_len`` tokens.

    First fit among the open batch's rows, in arrival order (an example goes into the first
    row with room); when none has room and the batch is full, the batch is emitted. Every
    example lands in exactly one row (examples are already cut to ``max_len``)."""
    rows: list[list[Example]] = []
    used: list[int] = []
    for ex in examples:
        n = len(ex.input_ids)
        for i, u in enumerate(used):
            if u + n <= max_len:
                rows[i].append(ex)
                used[i] += n
                break
        else:
            if len(rows) == batch_size:
                yield rows
                rows, used = [], []
            rows.append([ex])
            used.append(n)
    if rows:
        yield rows


def collate_packed(rows: Sequence[Sequence[Example]], k: int, pad_id: int) -> dict[str, Any]:
    """Packed rows as [B, L] arrays, L the longest packed row; ``cu_seqlens`` one int32 array
    per row; ``seq_index`` [B, L] the sequence a token belongs to (-1 on padding)."""
    b = len(rows)
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    batch: dict[str, Any] = {
        "input_ids": np.full((b, length), pad_id, dtype=np.int64),
        "attention_mask": np.zeros((b, length), dtype=np.int64),
        "position_ids": np.zeros((b, length), dtype=np.int64),
        "seq_index": np.full((b, length), -1, dtype=np.int64),
        "loss_mask": np.zeros((b, length), dtype=bool),
        "top_ids": np.full((b, length, k), pad_id, dtype=np.int32),
        "top_logprobs": np.zeros((b, length, k), dtype=np.float32),
        "logprobs": np.zeros((b, length), dtype=np.float32),
        "tail_logprob": np.zeros((b, length), dtype=np.float32),
        "cu_seqlens": [],
    }
    metas = [name for name in (rows[0][0].meta if rows and rows[0] else ())]
    for name in metas:
        batch[name] = []
    for r, row in enumerate(rows):
        cu = [0]
        for j, ex in enumerate(row):
            o, s = cu[-1], len(ex.input_ids)
            lo, hi = o + ex.start, o + ex.start + len(ex.loss_mask)
            batch["input_ids"][r, o : o + s] = ex.input_ids
            batch["attention_mask"][r, o : o + s] = 1
            batch["position_ids"][r, o : o + s] = np.arange(s)
            batch["seq_index"][r, o : o + s] = j
            batch["loss_mask"][r, lo:hi] = ex.loss_mask
            batch["top_ids"][r, lo:hi] = ex.top_ids
            batch["top_logprobs"][r, lo:hi] = ex.top_logprobs
            batch["logprobs"][r, lo:hi] = ex.logprobs
            batch["tail_logprob"][r, lo:hi] = ex.tail_logprob
            cu.append(o + s)
        batch["cu_seqlens"].append(np.asarray(cu, dtype=np.int32))
        for name in metas:
            batch[name].append([ex.meta[name] for ex in row])
    return batch


def block_diagonal_mask(cu_seqlens: np.ndarray, length: int) -> np.ndarray:
    """[length, length] bool: causal attention within each sequence of one packed row only
    (what varlen kernels compute from ``cu_seqlens``), for attention without them."""
    seq = np.full(length, -1, dtype=np.int64)
    for j in range(len(cu_seqlens) - 1):
        seq[cu_seqlens[j] : cu_seqlens[j + 1]] = j
    same = (seq[:, None] == seq[None, :]) & (seq[:, None] >= 0)
    return same & np.tril(np.ones((length, length), dtype=bool))
