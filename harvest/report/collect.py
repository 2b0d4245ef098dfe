"""Everything ``harvest report`` shows, gathered in one streaming pass over the output."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from harvest.outputs.provenance import report as provenance_report
from harvest.training import reader
from harvest.training.batches import open_dataset
from harvest.training.failures import FailureClass, failure_classes
from harvest.watch.logs import RUN_LOG
from harvest.watch.status import JobStatus, read_status
from workers.shards.columns import read_metadata
from workers.storage import store_for

MAX_POSITIONS = 1024  # positions past this are pooled into the last one
STATS = ("logprob", "top1", "mass", "entropy")
RUN_EVENTS = {"job_started", "job_finished", "endpoint_down", "endpoint_up", "circuit_opened",
              "retry_after_pause", "replica_restart", "request_failed"}  # fmt: skip


@dataclass
class ReportData:
    out: str
    meta: dict[str, Any] = field(default_factory=dict)
    prompts: set[str] = field(default_factory=set)
    samples: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    lengths: list[np.ndarray] = field(default_factory=list)
    finish: Counter[str] = field(default_factory=Counter)
    by_position: dict[str, np.ndarray] = field(
        default_factory=lambda: {k: np.zeros(MAX_POSITIONS) for k in (*STATS, "count")}
    )
    latency: dict[str, list[np.ndarray]] = field(default_factory=dict)  # endpoint -> ms
    failures: dict[str, FailureClass] = field(default_factory=dict)
    status: JobStatus | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    provenance: str = ""
    k: int = 0

    @property
    def failed_prompts(self) -> int:
        return sum(len(c.prompts) for c in self.failures.values())

    @property
    def length_array(self) -> np.ndarray:
        return np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)

    def add(self, batch: pa.RecordBatch) -> None:
        self.prompts.update(batch.column("prompt_id").to_pylist())
        self.samples += len(batch)
        lengths = batch.column("completion_tokens").to_numpy(zero_copy_only=False)
        self.lengths.append(lengths.astype(np.int64))
        self.tokens += int(lengths.sum())
        self.prompt_tokens += int(pc.sum(batch.column("prompt_tokens")).as_py() or 0)
        self.finish.update(str(r) for r in batch.column("finish_reason").to_pylist())
        for endpoint, ms in zip(batch.column("endpoint").to_pylist(),
                                batch.column("latency_ms").to_pylist(), strict=True):  # fmt: skip
            if ms is not None:
                self.latency.setdefault(endpoint or "-", []).append(np.array([ms]))
        self._positions(batch, lengths.astype(np.int64))

    def _positions(self, batch: pa.RecordBatch, lengths: np.ndarray) -> None:
        lps = pc.list_flatten(batch.column("logprobs")).to_numpy(zero_copy_only=False)
        if not len(lps):
            return
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        pos = np.minimum(np.arange(len(lps)) - starts, MAX_POSITIONS - 1)
        tops = pc.list_flatten(pc.list_flatten(batch.column("top_logprobs")))
        tops = tops.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(lps), -1)
        p = np.exp(tops)
        mass = p.sum(axis=1)
        tail = np.clip(1.0 - mass, 1e-12, 1.0)
        entropy = -(p * tops).sum(axis=1) - tail * np.log(tail)  # top-K + one tail bucket
        values = {"logprob": lps.astype(np.float64), "top1": p[:, 0], "mass": mass,
                  "entropy": entropy, "count": np.ones(len(lps))}  # fmt: skip
        for name, v in values.items():
            self.by_position[name] += np.bincount(pos, weights=v, minlength=MAX_POSITIONS)

    def position_means(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        count = self.by_position["count"]
        used = np.nonzero(count)[0]
        last = int(used[-1]) + 1 if len(used) else 0
        c = count[:last]
        return np.arange(last), {
            k: np.where(c > 0, self.by_position[k][:last] / np.maximum(c, 1), np.nan) for k in STATS
        }


def _events(out: str) -> list[dict[str, Any]]:
    try:
        raw = store_for(out).read_bytes(RUN_LOG)
    except FileNotFoundError:
        return []
    events = []
    for line in raw.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") in RUN_EVENTS:
            events.append(e)
    return events


def collect(out: str) -> ReportData:
    data = ReportData(out)
    data_files, failed_files = reader.data_files(out), reader.data_files(out, "failed")
    first = (data_files or failed_files or [None])[0]
    data.meta = read_metadata(first) if first else {}
    if data_files:
        dataset = open_dataset(out, allow_mixed=True)
        data.k = dataset.schema.field("top_logprobs").type.value_type.list_size
        columns = ["prompt_id", "completion_tokens", "prompt_tokens", "finish_reason",
                   "logprobs", "top_logprobs", "endpoint", "latency_ms"]  # fmt: skip
        for batch in dataset.to_batches(columns=columns, batch_size=1024):
            data.add(batch)
    data.failures = failure_classes(out, examples=3)
    data.prompts |= {p for c in data.failures.values() for p in c.prompts}
    try:
        data.status = read_status(out)
    except FileNotFoundError:
        data.status = None
    data.events = _events(out)
    data.provenance = provenance_report(out)[0]
    return data
