"""``harvest failures OUT``: why prompts failed, class by class.

For each error class: how many prompts and records, its distinct messages with counts, the
input lines (``file:line``) of its prompts and a few example records. Streams the committed
failure shards (``harvest.open_dataset(OUT, "failed")``); memory grows with the number of
distinct messages and the source lines kept (at most ``MAX_SOURCES`` per class).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from harvest.training import reader
from harvest.training.batches import OutDirs, open_dataset

MAX_SOURCES = 20
MAX_MESSAGES = 10
COLUMNS = ["prompt_id", "sample_index", "source", "raw", "error_class", "http_status",
           "message", "attempts", "endpoint"]  # fmt: skip


@dataclass
class FailureClass:
    """What one error class holds across the output."""

    name: str
    prompts: set[str] = field(default_factory=set)
    records: int = 0
    messages: Counter[str] = field(default_factory=Counter)
    sources: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any], examples: int) -> None:
        self.records += 1
        self.messages[row["message"]] += 1
        if row["prompt_id"] not in self.prompts:
            self.prompts.add(row["prompt_id"])
            if row["source"] and len(self.sources) < MAX_SOURCES:
                self.sources.append(row["source"])
            if len(self.examples) < examples:
                self.examples.append(row)


def failure_classes(out: OutDirs, examples: int = 3) -> dict[str, FailureClass]:
    """Every error class of ``out``'s committed failure shards, by name."""
    classes: dict[str, FailureClass] = {}
    if not reader.data_files(out, "failed"):
        return classes
    for batch in open_dataset(out, "failed", allow_mixed=True).to_batches(columns=COLUMNS):
        for row in batch.to_pylist():
            cls = row["error_class"]
            classes.setdefault(cls, FailureClass(cls)).add(row, examples)
    return classes


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _example(row: dict[str, Any]) -> str:
    parts = [f"[{row['prompt_id']} #{row['sample_index']}] {row['source'] or '-'}",
             f"attempts={row['attempts']}"]  # fmt: skip
    if row["http_status"] is not None:
        parts.append(f"http={row['http_status']}")
    if row["endpoint"]:
        parts.append(f"endpoint={row['endpoint']}")
    line = " ".join(parts) + f": {row['message']}"
    if row["raw"] is not None:
        raw = row["raw"] if len(row["raw"]) <= 120 else row["raw"][:117] + "..."
        line += f"; raw: {raw}"
    return line


def report(out: OutDirs, examples: int = 3) -> str:
    """The failures view as text."""
    classes = failure_classes(out, examples)
    if not classes:
        return f"{out}: no failure records"
    total = sum(len(c.prompts) for c in classes.values())
    lines = [f"{out}: {_plural(total, 'failed prompt')} in {len(classes)} error class(es)"]
    for c in sorted(classes.values(), key=lambda c: -len(c.prompts)):
        lines += ["", f"{c.name}: {_plural(len(c.prompts), 'prompt')} "
                      f"({_plural(c.records, 'record')})", "  messages:"]  # fmt: skip
        for message, n in c.messages.most_common(MAX_MESSAGES):
            lines.append(f"    {message} ({n})")
        if len(c.messages) > MAX_MESSAGES:
            lines.append(f"    ... and {len(c.messages) - MAX_MESSAGES} more messages")
        more = len(c.prompts) - len(c.sources)
        lines.append("  sources: " + (", ".join(c.sources) or "-")
                     + (f" and {more} more" if more > 0 else ""))  # fmt: skip
        if c.examples:
            lines += ["  examples:", *(f"    {_example(row)}" for row in c.examples)]
    lines += ["", "retry what may now succeed: harvest retry-failed OUT (InvalidInput is not "
                  "retried: fix the input lines above)"]  # fmt: skip
    return "\n".join(lines)
