"""The tests' one job builder: a model section, a job dict, a parsed spec, a job file.

Every test job authorises its models the same way (``AUTH``); a test names only what it cares
about: the model, its endpoints and settings, and whole sections (``sampling``, ``output``, ...),
which replace the defaults rather than merge into them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from schemas.job import JobSpec, parse_job

AUTH = {
    "owner": "teacher-harvest tests",
    "license": "apache-2.0",
    "attestation": "a model built or served by this repository's tests",
}
LOCAL = "http://127.0.0.1:8000"  # an endpoint for specs that never send a request
ROOT = Path(__file__).resolve().parents[1]


def model(
    name: str = "m", endpoints: str | list[str] | None = LOCAL, **settings: Any
) -> dict[str, Any]:
    """A teacher (or student) section: ``settings`` are its other fields (timeouts, managed
    ``replicas`` with ``endpoints=None``, an ``authorization`` that says more than AUTH)."""
    section: dict[str, Any] = {"model": name, "authorization": AUTH}
    if endpoints is not None:
        section["endpoints"] = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    return {**section, **settings}


def managed(name: str, weights: Path, count: int, **settings: Any) -> dict[str, Any]:
    """A model section served by ``count`` managed CPU vLLM replicas of ``weights`` (the tests'
    vLLM flags and cache), patient enough for restarts on a busy machine; ``settings`` as in
    ``model``."""
    replicas = {
        "count": count,
        "model": str(weights),
        "vllm_args": ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"],
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        "host": "127.0.0.1",
        "resources": {"num_cpus": 0.25},
        "cache_dir": str(ROOT / ".cache" / "test-vllm" / "cache"),
        "startup_timeout_s": 300,
    }
    patient = {"timeout_s": 60, "max_attempts": 10, "backoff_max_s": 5}
    return model(name, None, replicas=replicas, **{**patient, **settings})


def job(teacher: dict[str, Any] | None = None, input: Any = "x.jsonl", **sections: Any) -> dict:
    """A job dict; ``sections`` (mode, sampling, output, concurrency, student, ...) as given."""
    return {"input": input, "teacher": teacher or model(), **sections}


def spec(teacher: dict[str, Any] | None = None, input: Any = "x.jsonl", **sections: Any) -> JobSpec:
    return parse_job(job(teacher, input, **sections))


def write_job(folder: Path, job_dict: dict[str, Any], name: str = "job.yaml") -> Path:
    """The job as a file in ``folder`` (YAML, or JSON when ``name`` ends in .json)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    text = json.dumps(job_dict) if name.endswith(".json") else yaml.safe_dump(job_dict)
    path.write_text(text)
    return path
