"""Stream a harvest's committed shards as padded or packed numpy batches for distillation.

Memory stays bounded: shards are read one at a time, a few hundred rows per record batch (Parquet
decodes a row group at a time, so one row group is the floor), and a shuffle keeps at most
``shuffle_buffer`` rows. Only shards the manifest lists are read (through
``harvest.training.reader``), so temporary, orphaned or uncommitted files in ``OUT/data`` never
appear, and outputs of different teachers are refused unless ``allow_mixed=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from harvest.training import reader
from harvest.training.packing import collate_packed, pack_rows
from harvest.training.targets import TARGET_COLUMNS, Example, collate, examples_from_batch
from workers.shards.topk_codec import decode_batch, scan_columns, top_k_of

OutDirs = str | Path | list[str | Path]


def open_dataset(out: OutDirs, kind: str = "data", *, allow_mixed: bool = False) -> ds.Dataset:
    """A pyarrow Dataset over the committed ``kind`` shards of one or more harvest outputs."""
    return reader.dataset(out, kind, allow_mixed=allow_mixed)


def split_fragments(count: int, part: int, parts: int) -> tuple[list[int], list[int]]:
    """Which fragments ``part`` of ``parts`` reads whole, and which all parts share by row.

    Whole fragments go round-robin; the last ``count % parts`` (which cannot go one per part)
    are shared, row r of them going to part r % parts. Every row lands in exactly one part.
    """
    whole = count - count % parts
    return list(range(part, whole, parts)), list(range(whole, count))


def _read_fragment(
    fragment: ds.Fragment,
    schema: pa.Schema,
    columns: list[str],
    filter: ds.Expression | None,
    rows: int,
) -> Iterable[pa.RecordBatch]:
    """Record batches of one shard (the only place shard data is read; tests count calls), a
    compact top-K decoded."""
    batches = fragment.to_batches(schema=schema, columns=columns, filter=filter, batch_size=rows)
    return (decode_batch(b) for b in batches)


def iter_examples(
    dataset: ds.Dataset,
    max_len: int,
    *,
    part: int = 0,
    parts: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 1024,
    filter: ds.Expression | None = None,
    meta_columns: Sequence[str] = (),
    read_rows: int = 256,
) -> Iterator[Example]:
    """This part's records as aligned examples, streamed shard by shard."""
    fragments = list(dataset.get_fragments())
    if shuffle:  # the same permutation on every part (same seed), so the split stays disjoint
        order = np.random.default_rng(seed).permutation(len(fragments))
        fragments = [fragments[i] for i in order]
    whole, shared = split_fragments(len(fragments), part, parts)
    wanted = [*TARGET_COLUMNS, *(c for c in meta_columns if c not in TARGET_COLUMNS)]
    # Older layouts lack some columns (v1: prompt_token_ids); examples_from_batch says so.
    columns = scan_columns(dataset.schema, wanted)

    def stream() -> Iterator[Example]:
        for i in whole:
            frag = fragments[i]
            for batch in _read_fragment(frag, dataset.schema, columns, filter, read_rows):
                yield from examples_from_batch(batch, frag.path, max_len, meta_columns)
        seen = 0  # rows of shared fragments so far, counted identically on every part
        for i in shared:
            frag = fragments[i]
            for batch in _read_fragment(frag, dataset.schema, columns, filter, read_rows):
                keep = (np.arange(seen, seen + len(batch)) % parts) == part
                seen += len(batch)
                if keep.any():
                    mine = batch.filter(pa.array(keep))
                    yield from examples_from_batch(mine, frag.path, max_len, meta_columns)

    if not shuffle:
        yield from stream()
        return
    rng = np.random.default_rng([seed, part])
    buffer: list[Example] = []
    for ex in stream():
        if len(buffer) < shuffle_buffer:
            buffer.append(ex)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], ex = ex, buffer[j]
        yield ex
    rng.shuffle(buffer)
    yield from buffer


def iter_batches(
    out: OutDirs,
    batch_size: int,
    max_len: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    *,
    pad_id: int = 0,
    pad_to: str = "longest",
    pack: bool = False,
    shuffle_buffer: int = 1024,
    filter: ds.Expression | None = None,
    meta_columns: Sequence[str] = (),
    allow_mixed: bool = False,
    read_rows: int = 256,
) -> Batches:
    """Numpy batches of a harvest's committed records, for distilling into a student.

    Each batch holds ``input_ids`` [B, L] int64 (``prompt_token_ids + token_ids``, cut to
    ``max_len``, right-padded with ``pad_id``), ``attention_mask`` [B, L] int64,
    ``loss_mask`` [B, L] bool, ``top_ids`` [B, L, K] int32, ``top_logprobs`` [B, L, K] float32,
    ``logprobs`` [B, L] float32 (the sampled token's) and ``tail_logprob`` [B, L] float32
    (log of the teacher's mass outside its top K; -inf when the top K hold all of it; the
    worker's stored full-precision value when the shard has one).
    Alignment: the targets at position t describe the teacher's distribution for the token at
    position t + 1, so they line up with a causal LM's logits at t; ``loss_mask[b, t]`` is true
    exactly where ``input_ids[b, t + 1]`` is a trained response token (all of them in generate
    mode; where the record's own ``loss_mask`` says so when it has one). Where ``loss_mask`` is
    false the targets are ``pad_id`` / 0 and mean nothing.

    Padding: L is the batch's longest row (``pad_to="longest"``, the default) or ``max_len``
    (``pad_to="max_len"``). With ``pack=True`` each row instead holds several whole sequences
    (first fit, up to ``max_len`` tokens), and the batch adds ``position_ids`` [B, L]
    (restarting at 0 at each sequence), ``seq_index`` [B, L] (-1 on padding) and
    ``cu_seqlens`` (one int32 array per row, flash-attention varlen form); attention must
    then be block-diagonal (``harvest.training.packing.block_diagonal_mask``); no target
    crosses a boundary. Meta columns become one list per row.

    Truncation: a record longer than ``max_len`` keeps its first ``max_len`` tokens (prompt
    first), so the response tokens past it lose their targets; the trained targets lost are
    counted in the iterator's ``truncated_targets`` (and ``truncated_rows``) and a warning
    says how many when the iteration ends.

    ``rank`` / ``world_size`` select a disjoint part; the parts together hold every row once
    (split by shard, the remainder by row). Parts can differ by a few rows, so give every rank
    the same step count. With ``shuffle``, shard order and rows (through a buffer of
    ``shuffle_buffer`` rows) are shuffled by ``seed``; pass a new seed per epoch.
    ``filter`` (a pyarrow expression) selects rows; ``meta_columns`` adds those columns as lists.
    """
    if batch_size < 1 or max_len < 2:
        raise ValueError("batch_size must be >= 1 and max_len >= 2")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if pad_to not in ("max_len", "longest"):
        raise ValueError('pad_to is "max_len" or "longest"')
    dataset = open_dataset(out, allow_mixed=allow_mixed)
    k = top_k_of(dataset.schema)
    examples = iter_examples(
        dataset,
        max_len,
        part=rank,
        parts=world_size,
        shuffle=shuffle,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        filter=filter,
        meta_columns=meta_columns,
        read_rows=read_rows,
    )
    return Batches(examples, batch_size, max_len, k, pad_id, pad_to, pack, drop_last)


class Batches:
    """The iterator ``iter_batches`` returns: batches, and what ``max_len`` cut so far."""

    def __init__(
        self,
        examples: Iterator[Example],
        batch_size: int,
        max_len: int,
        k: int,
        pad_id: int,
        pad_to: str,
        pack: bool,
        drop_last: bool,
    ) -> None:
        self.truncated_targets = 0  # trained target tokens lost to max_len
        self.truncated_rows = 0  # records that lost any
        self.max_len = max_len
        self._it = self._batches(examples, batch_size, max_len, k, pad_id, pad_to, pack, drop_last)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._it)

    def _count(self, examples: Iterator[Example]) -> Iterator[Example]:
        for ex in examples:
            if ex.truncated:
                self.truncated_targets += ex.truncated
                self.truncated_rows += 1
            yield ex
        warn_truncated(self.max_len, self.truncated_targets, self.truncated_rows, stacklevel=3)

    def _batches(
        self,
        examples: Iterator[Example],
        batch_size: int,
        max_len: int,
        k: int,
        pad_id: int,
        pad_to: str,
        pack: bool,
        drop_last: bool,
    ) -> Iterator[dict[str, Any]]:
        counted = self._count(examples)
        if pack:
            for rows in pack_rows(counted, batch_size, max_len):
                if len(rows) == batch_size or not drop_last:
                    yield collate_packed(rows, k, pad_id)
            return
        pending: list[Example] = []
        for ex in counted:
            pending.append(ex)
            if len(pending) == batch_size:
                yield _collate(pending, max_len, k, pad_id, pad_to)
                pending = []
        if pending and not drop_last:
            yield _collate(pending, max_len, k, pad_id, pad_to)


class TruncatedTargets(UserWarning):
    """Records longer than ``max_len`` lost trained target tokens (the count is in the text)."""


def warn_truncated(max_len: int, targets: int, rows: int, stacklevel: int = 2) -> None:
    """Say how many trained target tokens ``max_len`` cut (never silent); nothing if none."""
    if targets:
        warnings.warn(
            f"max_len={max_len} cut {targets} trained target tokens from {rows} records "
            "(raise max_len to keep them)",
            TruncatedTargets,
            stacklevel=stacklevel + 1,
        )


def _collate(
    examples: list[Example], max_len: int, k: int, pad_id: int, pad_to: str
) -> dict[str, Any]:
    length = max_len if pad_to == "max_len" else max(len(e.input_ids) for e in examples)
    return collate(examples, length, k, pad_id)
