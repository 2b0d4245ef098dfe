"""What travels between the driver and the workers, and between the client and the writer.

Plain dataclasses (cheap to pickle through Ray); validation happens where data enters
(``harvest.inputs.sources``), so these carry already-checked values. ``UnitResult``, sent once
per unit, is a pydantic model: the commit record the driver stores derives from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict


@dataclass(slots=True)
class PromptRow:
    """One valid input row: either ``prompt`` (completions) or ``messages`` (chat)."""

    prompt_id: str
    source: str  # "file:line", for messages that point the user at the input
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    response: str | None = None  # score mode: the text to score after ``prompt``
    # Score mode, rows that carry ids (``harvest.inputs.idrows``): the exact ids to score
    # (nothing is re-tokenised), and what the record keeps of its source.
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    loss_mask: list[bool] | None = None  # over token_ids; None: every token is trained on
    student_logprobs: list[float] | None = None  # the source's logprob of each of token_ids
    request_id: str | None = None  # the source record's id, kept as the new record's
    sample_index: int = 0

    @property
    def api(self) -> str:
        return "chat" if self.messages is not None else "completions"


@dataclass(slots=True)
class RowProblem:
    """An input row that cannot be sent; it becomes failure records, never a silent drop."""

    prompt_id: str
    source: str
    reason: str
    raw: str | None = None
    sample_index: int = 0  # an ids row's source sample, kept on its failure record
    request_id: str | None = None


@dataclass(slots=True)
class WorkUnit:
    """A deterministic slice of one input file; one unit -> one data shard (+ failure shard)."""

    unit_id: str
    rows: list[PromptRow | RowProblem]


@dataclass(slots=True)
class Sample:
    """One parsed choice of a teacher response, in columnar-ready form."""

    sample_index: int
    response: str
    finish_reason: str | None
    token_ids: list[int]
    logprobs: list[float]
    # (tokens, K) per token, best first: int64 / float64 arrays from the parser (lists are
    # accepted too: the writer lays out either)
    top_token_ids: Any
    top_logprobs: Any
    loss_mask: list[bool] | None = None  # score mode: which token_ids to train on


@dataclass(slots=True)
class Answer:
    """One parsed 200 answer: its samples and the prompt as the teacher tokenised it."""

    samples: list[Sample]
    prompt_tokens: int | None
    prompt_token_ids: list[int] | None


@dataclass(slots=True)
class Completion:
    """A whole teacher answer for one row: its samples and how getting them went."""

    samples: list[Sample]
    prompt_tokens: int | None
    endpoint: str
    attempts: int
    latency_ms: float
    prompt_token_ids: list[int] | None = None  # the ids the teacher saw, template applied


class UnitResult(BaseModel):
    """What a worker reports after writing a unit's shards: the driver's commit record
    (``harvest.outputs.manifest.UnitCommit``) is this plus the job id, field for field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit_id: str
    prompts: int
    data_rows: int
    failure_rows: int
    completion_tokens: int
    data_path: str | None
    data_sha256: str | None
    failed_path: str | None
    failed_sha256: str | None
    endpoint_requests: dict[str, int]
    retries: int
    error_classes: dict[str, int]
    node_id: str = ""  # the Ray node whose worker harvested the unit


def request_id(prompt_id: str, sample_index: int, teacher: str, sampling: dict[str, Any]) -> str:
    """Stable key of one record: same prompt, sample, teacher and sampling -> same id."""
    blob = orjson.dumps([prompt_id, sample_index, teacher, sampling], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()[:32]
