"""Stream a harvest's committed shards as padded numpy batches for distillation.

Memory stays bounded: shards are read one at a time, a few hundred rows per record batch (Parquet
decodes a row group at a time, so one row group is the floor), and a shuffle keeps at most
``shuffle_buffer`` rows. Only shards the manifest lists are read (through
``harvest.training.reader``), so temporary, orphaned or uncommitted files in ``OUT/data`` never
appear, and outputs of different teachers are refused unless ``allow_mixed=True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from harvest.training import reader
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
    pad_to: str = "max_len",
    shuffle_buffer: int = 1024,
    filter: ds.Expression | None = None,
    meta_columns: Sequence[str] = (),
    allow_mixed: bool = False,
    read_rows: int = 256,
) -> Iterator[dict[str, Any]]:
    """Padded numpy batches of a harvest's committed records, for distilling into a student.

    Each batch holds ``input_ids`` [B, L] int64 (``prompt_token_ids + token_ids``, cut to
    ``max_len``, right-padded with ``pad_id``), ``attention_mask`` [B, L] int64,
    ``loss_mask`` [B, L] bool, ``top_ids`` [B, L, K] int32, ``top_logprobs`` [B, L, K] float32,
    ``logprobs`` [B, L] float32 (the sampled token's) and ``tail_logprob`` [B, L] float32
    (log of the teacher's mass outside its top K; -inf when the top K hold all of it).
    Alignment: the targets at position t describe the teacher's distribution for the token at
    position t + 1, so they line up with a causal LM's logits at t; ``loss_mask[b, t]`` is true
    exactly where ``input_ids[b, t + 1]`` is a trained response token (all of them in generate
    mode; where the record's own ``loss_mask`` says so when it has one). Where ``loss_mask`` is
    false the targets are ``pad_id`` / 0 and mean nothing.

    ``rank`` / ``world_size`` select a disjoint part; the parts together hold every row once
    (split by shard, the remainder by row). Parts can differ by a few rows, so give every rank
    the same step count. With ``shuffle``, shard order and rows (through a buffer of
    ``shuffle_buffer`` rows) are shuffled by ``seed``; pass a new seed per epoch.
    ``pad_to="longest"`` pads to the batch's longest row instead of ``max_len``. ``filter``
    (a pyarrow expression) selects rows; ``meta_columns`` adds those columns as lists.
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
    pending: list[Example] = []
    for ex in examples:
        pending.append(ex)
        if len(pending) == batch_size:
            yield _collate(pending, max_len, k, pad_id, pad_to)
            pending = []
    if pending and not drop_last:
        yield _collate(pending, max_len, k, pad_id, pad_to)


def _collate(
    examples: list[Example], max_len: int, k: int, pad_id: int, pad_to: str
) -> dict[str, Any]:
    length = max_len if pad_to == "max_len" else max(len(e.input_ids) for e in examples)
    return collate(examples, length, k, pad_id)
