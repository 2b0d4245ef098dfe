"""``Summary``: what a run did and what the output holds, as the CLI prints it and as
``_summary.json`` stores it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from harvest.outputs.manifest import UnitCommit, UnitState


@dataclass
class Summary:
    """What ``harvest run`` / ``retry-failed`` report: this run's work (``run_*``, ``retries``,
    ``endpoint_requests``, ``error_classes``) apart from the output as a whole (``data_rows``,
    ``failure_rows``, ``completion_tokens``), so a rate never mixes the two."""

    out_dir: str
    job_id: str
    prompts: int
    mode: str = "generate"  # score: the tokens are the given text's, scored
    prompts_this_run: int = 0
    data_rows: int = 0  # the output as a whole, after this run
    failure_rows: int = 0
    completion_tokens: int = 0
    prompts_done: int = 0
    run_data_rows: int = 0  # this run's commits
    run_failure_rows: int = 0
    run_tokens: int = 0
    run_failed_prompts: int = 0
    not_retried: Counter[str] = field(default_factory=Counter)  # retry-failed: class -> prompts
    elapsed_s: float = 0.0
    endpoint_requests: Counter[str] = field(default_factory=Counter)
    error_classes: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    worker_restarts: int = 0
    replica_restarts: int = 0
    units_by_node: Counter[str] = field(default_factory=Counter)
    interrupted: bool = False

    @property
    def tokens_per_s(self) -> float:
        """This run's tokens over this run's time (earlier runs' tokens never count)."""
        return self.run_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        """``_summary.json``: the run's figures and the output's, in labelled sections."""
        return {
            "job_id": self.job_id,
            "out_dir": self.out_dir,
            "interrupted": self.interrupted,
            "this_run": {
                "prompts": self.prompts_this_run,
                "harvested_prompts": self.prompts_this_run - self.run_failed_prompts,
                "failed_prompts": self.run_failed_prompts,
                "not_retried": dict(self.not_retried),
                "data_rows": self.run_data_rows,
                "failure_rows": self.run_failure_rows,
                "tokens": self.run_tokens,
                "tokens_are": "scored" if self.mode == "score" else "completion",
                "elapsed_s": self.elapsed_s,
                "tokens_per_s": self.tokens_per_s,
                "requests_by_endpoint": dict(self.endpoint_requests),
                "failed_prompts_by_class": dict(self.error_classes),
                "retries": self.retries,
                "worker_restarts": self.worker_restarts,
                "replica_restarts": self.replica_restarts,
                "units_by_node": dict(self.units_by_node),
            },
            "output": {
                "prompts": self.prompts,
                "prompts_done": self.prompts_done,
                "data_rows": self.data_rows,
                "failure_rows": self.failure_rows,
                "tokens": self.completion_tokens,
            },
        }

    def add(self, c: UnitCommit) -> None:
        """Count a commit made by this run (a unit's first harvest, or a retry of it)."""
        self.run_data_rows += c.data_rows
        self.run_failure_rows += c.failure_rows
        self.run_tokens += c.completion_tokens
        self.run_failed_prompts += sum(c.error_classes.values())
        self.endpoint_requests.update(c.endpoint_requests)
        self.error_classes.update(c.error_classes)
        self.retries += c.retries
        if c.node_id:
            self.units_by_node[c.node_id] += 1

    def resume(self, units: list[UnitState]) -> None:
        """Start from what earlier runs committed (the output's totals before this run)."""
        self.settle(units)

    def settle(self, units: list[UnitState]) -> None:
        """The output's totals, from its committed units."""
        self.data_rows = sum(u.data_rows for u in units)
        self.failure_rows = sum(u.failure_rows for u in units)
        self.completion_tokens = sum(u.completion_tokens for u in units)
        self.prompts_done = sum(u.base.prompts for u in units)
