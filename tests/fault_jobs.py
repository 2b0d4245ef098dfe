"""Job files for harvests against the fault-injecting teacher (tests/fault_teacher_server.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

N = 2  # samples per prompt in these jobs


def fault_job(folder: Path, url: str, rows: list[dict[str, Any]], **teacher: Any) -> Path:
    """Write ``rows`` (each {"prompt": ...} or {"messages": [...]}, ids p0, p1, ...) and a job
    for the fault server at ``url``; ``teacher`` overrides the teacher section's settings."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "prompts.jsonl", "w") as fh:
        for i, row in enumerate(rows):
            fh.write(json.dumps({"id": f"p{i}", **row}) + "\n")
    job = {
        "input": "prompts.jsonl",
        "teacher": {
            "model": "fault",
            "endpoints": [url],
            "authorization": {"owner": "tests", "license": "test", "attestation": "fault server"},
            "timeout_s": 2.0,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            **teacher,
        },
        "sampling": {"max_tokens": 4, "n": N, "logprobs": 3},
        "output": {"dir": "out", "rows_per_shard": 20},
        "concurrency": {"workers": 2, "in_flight_per_endpoint": 8, "worker_cpus": 0.25},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return folder / "job.yaml"
