"""``harvest inspect OUT``: what a harvest holds, before anyone trains on it.

Counts, the teacher and sampling from the shards' provenance, text histograms of response
lengths and sampled-token logprobs, and a few records decoded with the teacher's tokenizer when
``transformers`` can load it from the recorded ``model_root`` (else their text). Streams the
committed shards a record batch at a time; memory grows only with the number of prompt ids.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from harvest.training import reader
from harvest.training.batches import OutDirs, open_dataset
from workers.shards.columns import read_metadata
from workers.shards.topk_codec import decode_batch, scan_columns, top_k_of

# Sampled-token logprobs are counted on a fine fixed grid (bounded memory), then merged into a
# few bars spanning the range that actually occurs.
LP_FLOOR, LP_STEP = -40.0, 0.05
LP_BINS = int(-LP_FLOOR / LP_STEP)  # bin i >= 1: [FLOOR + (i-1) STEP, FLOOR + i STEP); 0 at the top
MASS_BINS = 20  # top-K mass histogram: bins of 0.05 over [0, 1]


def bars(labels: list[str], counts: list[int], width: int = 40) -> list[str]:
    """Plain-text horizontal bars, one line per label."""
    top = max(counts, default=0) or 1
    pad = max((len(x) for x in labels), default=0)
    return [
        f"  {label:>{pad}} | {'#' * math.ceil(width * c / top) if c else '':<{width}} {c}"
        for label, c in zip(labels, counts, strict=True)
    ]


def length_histogram(lengths: np.ndarray, bins: int = 8) -> list[str]:
    if not len(lengths):
        return ["  (none)"]
    lo, hi = int(lengths.min()), int(lengths.max())
    step = max(1, math.ceil((hi - lo + 1) / bins))
    edges = list(range(lo, hi + 1, step))
    counts = [int(((lengths >= e) & (lengths < e + step)).sum()) for e in edges]
    # The last bar ends at the longest length seen (never past max_tokens).
    labels = [
        f"{e}" if min(e + step - 1, hi) == e else f"{e}-{min(e + step - 1, hi)}" for e in edges
    ]
    return bars(labels, counts)


def finish_reason_lines(reasons: Counter[str]) -> list[str]:
    """How samples ended: ``length`` means max_tokens cut them off."""
    total = sum(reasons.values())
    if not total:
        return ["  (none)"]
    return [
        f"  {reason}: {n} ({100.0 * n / total:.1f}%)"
        for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    ]


def score_split(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """Score mode: per record, the scored tokens (the loss mask's) and the context tokens
    (the first token, stored as the prompt, and every unmasked one). A record without a mask
    is scored whole."""
    tokens = batch.column("completion_tokens").to_numpy(zero_copy_only=False).astype(np.int64)
    masks = batch.column("loss_mask")
    n = len(batch)
    lengths = pc.fill_null(pc.list_value_length(masks), 0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(masks).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(n), lengths)
    masked = np.bincount(rows, weights=flat, minlength=n).astype(np.int64)
    has_mask = np.asarray(masks.is_valid().to_numpy(zero_copy_only=False))
    scored = np.where(has_mask, masked, tokens)
    prompt = pc.fill_null(batch.column("prompt_tokens"), 0).to_numpy().astype(np.int64)
    return scored, prompt + tokens - scored


def score_sample(row: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    """Score mode: the context and the scored text of one record, split at its loss mask."""
    ids = list(row.get("prompt_token_ids") or []) + list(row["token_ids"])
    mask = [False] * (len(ids) - len(row["token_ids"])) + list(
        row.get("loss_mask") or [True] * len(row["token_ids"])
    )
    context = [t for t, m in zip(ids, mask, strict=True) if not m]
    scored = [t for t, m in zip(ids, mask, strict=True) if m]
    return tokenizer.decode(context), tokenizer.decode(scored)


def logprob_histogram(fine: np.ndarray, bars_wanted: int = 8) -> list[str]:
    """Merge the fine grid (index 0 = below LP_FLOOR) into a few bars over the occupied range."""
    used = np.nonzero(fine)[0]
    if not len(used):
        return ["  (none)"]
    first, last = int(used[0]), int(used[-1]) + 1
    step = max(1, math.ceil((last - first) / bars_wanted))
    labels, counts = [], []
    for start in range(first, last, step):
        stop = min(start + step, last)
        lo = "-inf" if start == 0 else f"{LP_FLOOR + (start - 1) * LP_STEP:.2f}"
        hi = f"{LP_FLOOR + (stop - 1) * LP_STEP:.2f})" if stop <= LP_BINS else "0]"
        labels.append(f"[{lo}, {hi}")
        counts.append(int(fine[start:stop].sum()))
    return bars(labels, counts)


def mass_histogram(counts: np.ndarray) -> list[str]:
    """Bars of the per-token top-K mass over the occupied part of [0, 1]."""
    used = np.nonzero(counts)[0]
    first, last = int(used[0]), int(used[-1]) + 1
    step = 1.0 / len(counts)
    labels = [f"{i * step:.2f}-{(i + 1) * step:.2f}" for i in range(first, last)]
    return bars(labels, [int(c) for c in counts[first:last]])


def _tokenizer(model_root: str | None) -> Any:
    """The teacher's tokenizer if transformers can load it from model_root, else None."""
    if not model_root or not Path(model_root).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_root, local_files_only=True)
    except Exception:  # missing package, unreadable folder: fall back to the stored text
        return None


def _short(text: str | None, limit: int = 160) -> str:
    text = "" if text is None else text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sample_lines(dataset: ds.Dataset, count: int, tokenizer: Any, score: bool = False) -> list[str]:
    lines = []
    second = "scored" if score else "response"
    for row in dataset.head(count).to_pylist():
        finish = "" if score else f" finish={row['finish_reason']}"
        lines.append(f"  [{row['prompt_id']} #{row['sample_index']}]{finish}")
        if score and tokenizer is not None:
            prompt, response = score_sample(row, tokenizer)
            how = "decoded"
        elif tokenizer is not None and row.get("prompt_token_ids") is not None:
            prompt = tokenizer.decode(row["prompt_token_ids"])
            response = tokenizer.decode(row["token_ids"])
            how = "decoded"
        else:
            msgs = row.get("messages")
            prompt = row.get("prompt") or " | ".join(
                f"{m['role']}: {m['content']}" for m in msgs or []
            )
            response, how = row["response"], "text"
        lines += [
            f"    prompt ({how}):   {_short(prompt)}",
            f"    {second} ({how}):{' ' * (8 - len(second))} {_short(response)}",
        ]
    return lines


@dataclass
class Scan:
    """What one pass over the committed shards counts."""

    prompts: set[str] = field(default_factory=set)
    lengths: list[np.ndarray] = field(default_factory=list)
    prompt_lengths: list[np.ndarray] = field(default_factory=list)
    logprobs: np.ndarray = field(default_factory=lambda: np.zeros(LP_BINS + 1, dtype=np.int64))
    top_mass: float = 0.0  # summed over positions
    # per-token top-K mass on a grid of MASS_BINS bins over [0, 1] (the last bin holds 1.0)
    mass_bins: np.ndarray = field(default_factory=lambda: np.zeros(MASS_BINS, dtype=np.int64))
    positions: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    finish_reasons: Counter[str] = field(default_factory=Counter)
    score: bool = False  # score mode: lengths are scored / context tokens (the loss mask)

    def add_data(self, batch: pa.RecordBatch) -> None:
        self.prompts.update(batch.column("prompt_id").to_pylist())
        self.finish_reasons.update(str(r) for r in batch.column("finish_reason").to_pylist())
        if self.score:
            scored, context = score_split(batch)
            self.lengths.append(scored)
            self.prompt_lengths.append(context)
        else:
            self.lengths.append(batch.column("completion_tokens").to_numpy(zero_copy_only=False))
            self.prompt_lengths.append(pc.drop_null(batch.column("prompt_tokens")).to_numpy())
        lps = pc.list_flatten(batch.column("logprobs")).to_numpy(zero_copy_only=False)
        idx = np.clip(np.floor((lps - LP_FLOOR) / LP_STEP).astype(np.int64) + 1, 0, LP_BINS)
        self.logprobs += np.bincount(idx, minlength=LP_BINS + 1)
        if "tail_logprob" in batch.schema.names and not batch.column("tail_logprob").null_count:
            tail = pc.list_flatten(batch.column("tail_logprob")).to_numpy(zero_copy_only=False)
            mass = -np.expm1(tail.astype(np.float64))  # 1 - tail, from the stored exact tail
        else:
            k = batch.schema.field("top_logprobs").type.value_type.list_size
            tops = pc.list_flatten(pc.list_flatten(batch.column("top_logprobs")))
            flat = tops.to_numpy(zero_copy_only=False).astype(np.float64)
            mass = np.exp(flat).reshape(-1, k).sum(axis=1) if k else np.zeros(len(lps))
        self.top_mass += float(mass.sum())
        self.mass_bins += np.bincount(
            np.clip((mass * MASS_BINS).astype(np.int64), 0, MASS_BINS - 1), minlength=MASS_BINS
        )
        self.positions += len(lps)

    def add_failed(self, batch: pa.RecordBatch) -> None:
        self.prompts.update(batch.column("prompt_id").to_pylist())
        self.failures.update(batch.column("error_class").to_pylist())


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def report(out: OutDirs, samples: int = 3, decode: bool = True) -> str:
    """The whole inspection as text."""
    data_files, failed_files = reader.data_files(out), reader.data_files(out, "failed")
    first = (data_files or failed_files or [None])[0]
    meta = read_metadata(first) if first else {}
    score = meta.get("mode") == "score"
    scan = Scan(score=score)
    data = open_dataset(out, allow_mixed=True) if data_files else None
    if data is not None:
        data_columns = ["prompt_id", "completion_tokens", "prompt_tokens", "logprobs"]
        data_columns += ["finish_reason", "loss_mask"]
        stored = scan_columns(data.schema, [*data_columns, "top_logprobs", "tail_logprob"])
        for batch in data.to_batches(columns=stored, batch_size=1024):
            scan.add_data(decode_batch(batch))
    if failed_files:
        failed = open_dataset(out, "failed", allow_mixed=True)
        for batch in failed.to_batches(columns=["prompt_id", "error_class"]):
            scan.add_failed(batch)
    teacher = meta.get("teacher") or {}
    length, p_length = _concat(scan.lengths), _concat(scan.prompt_lengths)
    lines = [
        f"output:    {out}",
        f"job:       {meta.get('job_id')} (schema v{meta.get('schema_version')})",
        f"teacher:   {teacher.get('model')} (loaded from {teacher.get('model_root')}; "
        f"tokenizer {teacher.get('tokenizer_hash') or 'unknown'})",
        f"sampling:  {_sampling(meta.get('sampling') or {}, score)}",
        f"prompts:   {len(scan.prompts)}   samples: {len(length)}   shards: {len(data_files)} "
        f"data, {len(failed_files)} failed",
        _tokens_line(int(length.sum()), int(p_length.sum()), score),
        f"failures:  {sum(scan.failures.values())} records"
        + "".join(f"\n  {cls}: {n}" for cls, n in sorted(scan.failures.items())),
    ]
    try:
        reader.check_same_teacher(data_files)
    except reader.MixedTeachersError as err:
        lines.append(f"WARNING: {err}")
    if data is not None and scan.positions:
        k = top_k_of(data.schema)
        mean = scan.top_mass / scan.positions
        lines.append(f"teacher top-{k} mass per token: mean {mean:.4f} (tail {1 - mean:.4f})")
    lines += topk_lines(data_files)
    first_len, second_len = ("context", "scored") if score else ("prompt", "response")
    lines += ["", f"{first_len} length (tokens):", *length_histogram(p_length)]
    lines += ["", f"{second_len} length (tokens):", *length_histogram(length)]
    if not score:
        lines += ["", "finish reasons:", *finish_reason_lines(scan.finish_reasons)]
    lines += ["", "sampled-token logprob:", *logprob_histogram(scan.logprobs)]
    if scan.positions:
        lines += ["", "teacher top-K mass per token:", *mass_histogram(scan.mass_bins)]
    if samples and data is not None:
        tok = _tokenizer(teacher.get("model_root")) if decode else None
        lines += ["", f"first {samples} records:", *sample_lines(data, samples, tok, score)]
    return "\n".join(lines)


def topk_lines(data_files: list[str]) -> list[str]:
    """How the shards store the top-K and, for a lossy encoding, the error measured on each
    shard when it was written (the largest over the shards; KL averaged over positions)."""
    entries = [read_metadata(f).get("topk_encoding") for f in data_files]
    if not entries:
        return []
    if any(e is None for e in entries):
        return ["top-K encoding: float32 (shards written before encodings were recorded)"]
    names = sorted({e["name"] for e in entries})
    lossy = [e for e in entries if "mean_top_k_kl" in e]
    if not lossy:
        return [f"top-K encoding: {', '.join(names)}"]
    positions = sum(e["positions"] for e in lossy)
    kl = sum(e["mean_top_k_kl"] * e["positions"] for e in lossy) / positions if positions else 0.0
    worst = max(e["max_abs_logprob_error"] for e in lossy)
    return [
        f"top-K encoding: {', '.join(names)}; error measured at write on {len(lossy)} shards: "
        f"largest |logprob error| {worst:.4g} nats, mean top-K KL {kl:.3g} nats"
    ]


def _tokens_line(response: int, prompt: int, score: bool) -> str:
    if score:
        return f"tokens:    {response} scored (trained on), {prompt} context"
    return f"tokens:    {response} response, {prompt} prompt"


def _sampling(sampling: dict[str, Any], score: bool = False) -> str:
    if score:  # teacher forcing: nothing is sampled; only the top-K width applies
        return f"score mode (teacher forcing, no sampling), logprobs={sampling.get('logprobs')}"
    return ", ".join(f"{k}={v}" for k, v in sampling.items() if v is not None) or "unknown"
