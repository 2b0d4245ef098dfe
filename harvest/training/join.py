"""Several teachers on the same records: join their scored outputs into per-teacher targets.

Each teacher scores the same records in its own score-mode job, on the same input (typically a
student's harvest, ``input.format: harvest``) with the same ``output.rows_per_shard``, so the
outputs hold the same units; every record keeps its source's ``request_id``. The join reads one
unit at a time from every output (its committed shards only, through the manifest), matches
records by ``request_id`` and checks that their token ids (``prompt_token_ids`` and
``token_ids``) and loss masks are exactly equal: targets of different sequences, or of a
sequence one teacher scored under other ids, would be misaligned silently. The first record
that differs, or that one output lacks, stops the join with ``JoinError`` naming it.

    for batch in harvest.iter_joined({"big": "out_big", "small": "out_small"}, 16, 1024):
        batch["input_ids"], batch["attention_mask"], batch["loss_mask"]  # shared, [B, L]
        batch["teachers"]["big"]["top_ids"]  # [B, L, K_big]; also top_logprobs, logprobs,
        # tail_logprob, as iter_batches gives them (each teacher may have its own K)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from harvest.outputs import manifest
from harvest.training import reader
from harvest.training.batches import warn_truncated
from harvest.training.targets import TARGET_COLUMNS, collate, examples_from_batch
from workers.storage import Store, open_store

Out = str | Path
SEQUENCE = ("prompt_token_ids", "token_ids", "loss_mask")
SHARED = ("input_ids", "attention_mask", "loss_mask")


class JoinError(ValueError):
    """The outputs do not hold the same records with the same token ids."""


def _units(out: Out) -> tuple[Store, dict[str, list[str]]]:
    store = open_store(str(out))
    units = manifest.load(store).units
    return store, {
        uid: state.data_paths for uid, state in sorted(units.items()) if state.data_paths
    }


def _read_unit(store: Store, paths: list[str]) -> pa.Table:
    cols = ["request_id", "prompt_id", "sample_index", *TARGET_COLUMNS]
    tables = []
    for p in paths:
        f = pq.ParquetFile(store.open_input_file(p))
        tables.append(f.read(columns=[c for c in cols if c in f.schema_arrow.names]))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _describe(row: dict[str, Any]) -> str:
    rid, pid, index = row["request_id"], row["prompt_id"], row["sample_index"]
    return f"request_id {rid} (prompt {pid!r}, sample {index})"


def align(tables: Mapping[str, pa.Table], unit: str) -> dict[str, pa.Table]:
    """Every table in the first one's row order, once their records are checked to match."""
    names = list(tables)
    first = tables[names[0]]
    order = first["request_id"].to_pylist()
    out = {names[0]: first}
    for name in names[1:]:
        table = tables[name]
        where = {rid: i for i, rid in enumerate(table["request_id"].to_pylist())}
        missing = next((i for i, rid in enumerate(order) if rid not in where), None)
        if missing is not None or len(where) != len(order):
            if missing is None:  # the other one holds a record the first lacks
                extra = next(i for i, rid in enumerate(where) if rid not in set(order))
                row = table.slice(extra, 1).to_pylist()[0]
                raise JoinError(f"unit {unit}: {_describe(row)} is in {name!r} only")
            row = first.slice(missing, 1).to_pylist()[0]
            raise JoinError(f"unit {unit}: {_describe(row)} is missing from {name!r}")
        taken = table.take(pa.array([where[rid] for rid in order], pa.int64()))
        for col in SEQUENCE:
            a = first[col] if col in first.column_names else None
            b = taken[col] if col in taken.column_names else None
            if a is None and b is None:
                continue
            if a is None or b is None or not a.equals(b):
                i = _first_difference(a, b, len(order))
                row = first.slice(i, 1).to_pylist()[0]
                raise JoinError(
                    f"unit {unit}: {_describe(row)} has other {col} in {name!r} than in "
                    f"{names[0]!r}: the teachers scored different sequences"
                )
        out[name] = taken
    return out


def _first_difference(a: Any, b: Any, n: int) -> int:
    if a is None or b is None:
        return 0
    for i in range(n):
        if a[i].as_py() != b[i].as_py():
            return i
    return 0


def iter_joined(
    teachers: Mapping[str, Out],
    batch_size: int,
    max_len: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    *,
    pad_id: int = 0,
    meta_columns: tuple[str, ...] = (),
) -> Iterator[dict[str, Any]]:
    """Padded batches of records every teacher scored, with each teacher's targets.

    The shared arrays are as ``iter_batches`` gives them; ``batch["teachers"][name]`` holds
    that teacher's ``top_ids``, ``top_logprobs``, ``logprobs`` and ``tail_logprob``.
    ``rank`` / ``world_size`` split by unit (round robin), so every record lands on one rank;
    ``shuffle`` permutes the unit order and the rows within each unit by ``seed``."""
    if len(teachers) < 2:
        raise ValueError("iter_joined needs two or more teachers' outputs; use iter_batches")
    if batch_size < 1 or max_len < 2 or not 0 <= rank < world_size:
        raise ValueError("need batch_size >= 1, max_len >= 2 and 0 <= rank < world_size")
    for out in teachers.values():  # one teacher per output; across outputs they differ
        reader.check_same_teacher(reader.data_files(out))
    outs = {name: _units(out) for name, out in teachers.items()}
    names = list(outs)
    units = list(outs[names[0]][1])
    for name in names[1:]:
        if list(outs[name][1]) != units:
            raise JoinError(
                f"{teachers[name]} and {teachers[names[0]]} hold different units: score the "
                "same input with the same output.rows_per_shard for every teacher"
            )
    rng = np.random.default_rng(seed)
    if shuffle:
        units = [units[i] for i in rng.permutation(len(units))]
    pending: dict[str, list[Any]] = {name: [] for name in names}
    truncated = [0, 0]  # target tokens and records that max_len cut (warned, never silent)
    for unit in units[rank::world_size]:
        tables = align({n: _read_unit(outs[n][0], outs[n][1][unit]) for n in names}, unit)
        perm = rng.permutation(len(tables[names[0]])) if shuffle else None
        for name, table in tables.items():
            if perm is not None:
                table = table.take(pa.array(perm))
            cols = meta_columns if name == names[0] else ()
            for batch in table.to_batches():
                examples = examples_from_batch(batch, unit, max_len, cols)
                if name == names[0]:  # the same ids for every teacher: count them once
                    cut = [ex.truncated for ex in examples if ex.truncated]
                    truncated[0] += sum(cut)
                    truncated[1] += len(cut)
                pending[name].extend(examples)
        while len(pending[names[0]]) >= batch_size:
            yield _collate(pending, names, batch_size, max_len, pad_id)
    if pending[names[0]] and not drop_last:
        yield _collate(pending, names, len(pending[names[0]]), max_len, pad_id)
    warn_truncated(max_len, *truncated)


def _collate(
    pending: dict[str, list[Any]], names: list[str], n: int, max_len: int, pad_id: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"teachers": {}}
    # Every teacher's records hold the same ids: one length, the batch's longest row.
    length = max(len(ex.input_ids) for ex in pending[names[0]][:n])
    for name in names:
        examples, pending[name] = pending[name][:n], pending[name][n:]
        k = examples[0].top_ids.shape[1] if examples[0].top_ids.ndim == 2 else 0
        batch = collate(examples, length, k, pad_id)
        if name == names[0]:
            out.update({key: v for key, v in batch.items() if key not in _TARGETS})
        out["teachers"][name] = {key: batch[key] for key in _TARGETS}
    return out


_TARGETS = ("top_ids", "top_logprobs", "logprobs", "tail_logprob")
