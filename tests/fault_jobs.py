"""Job files for harvests against the fault-injecting teacher (tests/fault_teacher_server.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jobs

N = 2  # samples per prompt in these jobs


def fault_job(folder: Path, url: str, rows: list[dict[str, Any]], **teacher: Any) -> Path:
    """Write ``rows`` (each {"prompt": ...} or {"messages": [...]}, ids p0, p1, ...) and a job
    for the fault server at ``url``; ``teacher`` overrides the teacher section's settings."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "prompts.jsonl", "w") as fh:
        for i, row in enumerate(rows):
            fh.write(json.dumps({"id": f"p{i}", **row}) + "\n")
    settings = {"timeout_s": 2.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.5, **teacher}
    job = jobs.job(
        jobs.model("fault", url, **settings),
        "prompts.jsonl",
        sampling={"max_tokens": 4, "n": N, "logprobs": 3},
        output={"dir": "out", "rows_per_shard": 20},
        concurrency={"workers": 2, "in_flight_per_endpoint": 8, "worker_cpus": 0.25},
    )
    return jobs.write_job(folder, job)
