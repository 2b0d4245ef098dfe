"""The compact top-K encoding (``output.topk_encoding: compact``): one binary blob per record.

Why this layout (measured in bench/encodings.py on SmolLM2-135M at K=128): a trained teacher's
top-K ids, sorted within a token, are mostly small ids close together (BPE vocabularies number
frequent tokens first), so their deltas compress to ~0.5 byte each, where the same ids in rank
order stay near 2 bytes; each logprob is stored as its gap below the token's best, rounded to
1/16 nat (error at most 1/32 nat; the top-K KL that costs is ~1e-5 nats), in the ids' order.
Planes of equal-weight bytes let zstd see runs of zeros. The best logprob of each token is kept
exactly (float32). The Parquet column is ``top_k_compact`` (binary); harvest's readers decode it
back to ``top_token_ids`` / ``top_logprobs`` (``decode_batch``); other Parquet readers see bytes.

Blob layout (little-endian): header ``<4sHBBIf`` (magic ``HTK1``, K, id planes, gap planes,
tokens n, step), float32[n] best logprobs, then ``id planes`` planes of n*K bytes (byte j of
each id delta, ids ascending per token, the first delta from 0), then ``gap planes`` planes of
n*K bytes (byte j of round(gap / step), clamped to the planes' range, in the same order).
Alternatives whose gaps round to the same step come back ordered by id, so ranks within one
step (1/16 nat) may differ from the server's; every (id, logprob) pair is within the error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from schemas.records import TOPK_COMPACT_COLUMN as COLUMN

NAME = "compact"
MAGIC = b"HTK1"
HEADER = struct.Struct("<4sHBBIf")
STEP = 1.0 / 16  # nats per gap step: max error 1/32 nat
GAP_PLANES = 2  # gaps up to 65535 steps (4096 nats); deeper ones are clamped (and counted)


@dataclass
class CodecError:
    """What a lossy encoding cost, against the full-precision (float64) values it was given."""

    max_abs_logprob_error: float = 0.0
    kl_sum: float = 0.0  # summed over positions: KL(top-K true || top-K decoded), renormalised
    positions: int = 0

    def add(self, other: CodecError) -> None:
        self.max_abs_logprob_error = max(self.max_abs_logprob_error, other.max_abs_logprob_error)
        self.kl_sum += other.kl_sum
        self.positions += other.positions

    def summary(self) -> dict[str, float | int | str]:
        """The shard metadata's ``topk_encoding`` entry."""
        return {
            "name": NAME,
            "step_nats": STEP,
            "max_abs_logprob_error": float(self.max_abs_logprob_error),
            "mean_top_k_kl": self.kl_sum / self.positions if self.positions else 0.0,
            "positions": self.positions,
        }


def _planes(values: np.ndarray, count: int) -> bytes:
    """``count`` little-endian byte planes of non-negative ``values`` (uint64)."""
    v = values.astype("<u8", copy=False).reshape(-1)
    return v.view(np.uint8).reshape(-1, 8)[:, :count].T.tobytes()


def _unplanes(buf: memoryview, count: int, size: int) -> np.ndarray:
    planes = np.frombuffer(buf, np.uint8, count * size).reshape(count, size).astype(np.uint64)
    out = np.zeros(size, np.uint64)
    for j in range(count):
        out |= planes[j] << np.uint64(8 * j)
    return out


def top_k_kl(true: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """Per position, KL(p || q) of the top-K renormalised, p from ``true`` logprobs, q from
    ``approx`` (same alternatives, same order), in nats."""
    lp = true - true.max(axis=1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(axis=1, keepdims=True))
    lq = approx - approx.max(axis=1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(axis=1, keepdims=True))
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0.0)


def encode(ids: np.ndarray, lps: np.ndarray) -> tuple[bytes, CodecError]:
    """One record's (n, K) top-K ids and logprobs (best first) as a blob, and what it cost."""
    n, k = ids.shape
    err = CodecError(positions=n)
    if n == 0 or k == 0:
        return HEADER.pack(MAGIC, k, 0, GAP_PLANES, n, STEP), err
    order = np.argsort(ids, axis=1, kind="stable")
    sids = np.take_along_axis(ids, order, axis=1).astype(np.int64)
    slps = np.take_along_axis(lps, order, axis=1).astype(np.float64)
    best = lps.max(axis=1).astype(np.float32)
    gap = np.nan_to_num(best.astype(np.float64)[:, None] - slps, posinf=1e30)
    q = np.minimum(np.rint(np.maximum(gap, 0.0) / STEP), 256**GAP_PLANES - 1).astype(np.uint64)
    deltas = np.diff(sids, axis=1, prepend=0)
    if deltas.min() < 0:
        raise ValueError("top-K ids must be non-negative and distinct per token")
    id_planes = max(1, (int(deltas.max()).bit_length() + 7) // 8)
    decoded = (best[:, None] - (q.astype(np.float64) * STEP).astype(np.float32)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(decoded.astype(np.float64) - slps)
        err.max_abs_logprob_error = float(np.nanmax(diff)) if diff.size else 0.0
        err.kl_sum = float(top_k_kl(slps, decoded.astype(np.float64)).sum())
    blob = b"".join(
        (
            HEADER.pack(MAGIC, k, id_planes, GAP_PLANES, n, STEP),
            best.astype("<f4").tobytes(),
            _planes(deltas.astype(np.uint64), id_planes),
            _planes(q, GAP_PLANES),
        )
    )
    return blob, err


def decode(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A blob back to (n, K) int32 ids and float32 logprobs, best first."""
    magic, k, id_planes, gap_planes, n, step = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise ValueError("not a compact top-K blob (bad magic)")
    view, at = memoryview(blob), HEADER.size
    best = np.frombuffer(view[at : at + 4 * n], "<f4")
    at += 4 * n
    size = n * k
    if size == 0:
        return np.zeros((n, k), np.int32), np.zeros((n, k), np.float32)
    deltas = _unplanes(view[at:], id_planes, size).reshape(n, k)
    at += id_planes * size
    q = _unplanes(view[at:], gap_planes, size).reshape(n, k)
    sids = np.cumsum(deltas.astype(np.int64), axis=1)
    order = np.argsort(q, axis=1, kind="stable")  # best first; ties stay in id order
    ids = np.take_along_axis(sids, order, axis=1).astype(np.int32)
    gaps = (np.take_along_axis(q, order, axis=1).astype(np.float64) * step).astype(np.float32)
    return ids, (best[:, None] - gaps).astype(np.float32)


def top_k_of(schema: pa.Schema) -> int:
    """K of a data shard's schema, whichever top-K encoding it uses."""
    if "top_token_ids" in schema.names:
        return schema.field("top_token_ids").type.value_type.list_size
    meta = schema.field(COLUMN).metadata or {}
    return int(meta[b"k"])


def decode_column(blobs: pa.Array, k: int, lp_type: pa.DataType) -> tuple[pa.Array, pa.Array]:
    """``top_k_compact`` values as ``top_token_ids`` and ``top_logprobs`` list arrays."""
    ids_parts, lps_parts, lengths = [], [], []
    for blob in blobs.to_pylist():
        ids, lps = decode(blob)
        ids_parts.append(ids.reshape(-1))
        lps_parts.append(lps.reshape(-1))
        lengths.append(len(ids))
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
    flat_lps = np.concatenate(lps_parts) if lps_parts else np.zeros(0, np.float32)
    off = pa.array(offsets)
    ids_arr = pa.ListArray.from_arrays(
        off, pa.FixedSizeListArray.from_arrays(pa.array(flat_ids, pa.int32()), k)
    )
    lps_arr = pa.ListArray.from_arrays(
        off, pa.FixedSizeListArray.from_arrays(pa.array(flat_lps).cast(lp_type), k)
    )
    return ids_arr, lps_arr


def decode_batch(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
    """``batch`` with ``top_k_compact`` (if it has it) replaced by ``top_token_ids`` and
    ``top_logprobs`` in its place; anything else passes through as it is."""
    names = batch.schema.names
    if COLUMN not in names:
        return batch
    k = top_k_of(batch.schema)
    column = batch.column(COLUMN)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    ids, lps = decode_column(column, k, pa.float32())
    at = names.index(COLUMN)
    out = batch.remove_column(at)
    out = out.add_column(at, pa.field("top_logprobs", lps.type, nullable=False), lps)
    return out.add_column(at, pa.field("top_token_ids", ids.type, nullable=False), ids)


def scan_columns(schema: pa.Schema, wanted: list[str]) -> list[str]:
    """The stored columns to read for ``wanted`` decoded columns (top-K names map to the
    compact column when the shards hold it)."""
    if COLUMN not in schema.names:
        return [c for c in wanted if c in schema.names]
    out: list[str] = []
    for c in wanted:
        c = COLUMN if c in ("top_token_ids", "top_logprobs") else c
        if c in schema.names and c not in out:
            out.append(c)
    return out
