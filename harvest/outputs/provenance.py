"""Where a harvest's records came from, read back from the shards themselves.

Every shard carries its provenance in Parquet key-value metadata (see ``harvest.driver.scheduler``).
``harvest provenance OUT`` prints it and checks that all committed shards agree; the training
reader uses ``teacher_identity`` to refuse mixing shards from different teachers or tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harvest.outputs import manifest
from harvest.outputs.manifest import Manifest, ResumeRefused
from workers.shards.columns import read_metadata

# What must be identical across every shard of one output.
AGREED = (
    "job_id", "schema_version", "mode", "teacher", "authorization", "sampling", "logprob_mode",
    "student",
)  # fmt: skip
# Shards written before a key existed hold its default (no "mode": generate mode).
DEFAULTS = {"mode": "generate"}


def shard_metadata(out_dir: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, metadata) of every committed shard of a folder or URI."""
    m = manifest.load(str(out_dir))
    locations = [m.store.child_uri(p) for kind in ("data", "failed") for p in m.shard_paths(kind)]
    return [(loc, read_metadata(loc)) for loc in locations]


def check_logprob_mode(held: Manifest, mode: str) -> None:
    """Refuse to add shards of another logprob mode to an output that holds some.

    A vLLM server restarted with another ``--logprobs-mode`` between two runs of one job would
    mix raw and processed values in one output, and a reader could not tell which rows are
    which. Known against known only: "unknown" (the probe could not tell) is never a conflict.
    """
    first = (held.shard_paths("data") or held.shard_paths("failed"))[:1]
    if mode == "unknown" or not first:
        return
    before = read_metadata(held.store.child_uri(first[0])).get("logprob_mode", "unknown")
    if before not in ("unknown", mode):
        raise ResumeRefused(
            f"{held.store.uri} holds shards of logprob mode {before}, and the teacher now "
            f"returns {mode} (was vLLM restarted with another --logprobs-mode?); restart it "
            "as before, or use another --output, or --force-new to discard it"
        )


def teacher_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of a shard's provenance that decides whether records can be mixed."""
    return {"teacher": meta.get("teacher"), "schema_version": meta.get("schema_version")}


def _name(location: str) -> str:
    return location.rsplit("/", 1)[-1]


def disagreements(shards: list[tuple[str, dict[str, Any]]]) -> list[str]:
    if not shards:
        return []
    first_path, first = shards[0]
    out = []
    for path, meta in shards[1:]:
        for key in AGREED:
            if meta.get(key, DEFAULTS.get(key)) != first.get(key, DEFAULTS.get(key)):
                out.append(f"{_name(path)}: {key} differs from {_name(first_path)}")
    return out


def report(out_dir: str | Path) -> tuple[str, bool]:
    """A readable provenance summary, and whether every shard agrees."""
    shards = shard_metadata(out_dir)
    if not shards:
        return f"{out_dir}: no committed shards yet", True
    meta = shards[0][1]
    teacher, auth = meta.get("teacher") or {}, meta.get("authorization") or {}
    kinds = [m.get("kind") for _, m in shards]
    started = min(m.get("run_started_at", "") for _, m in shards)
    written = max(m.get("written_at", "") for _, m in shards)
    lines = [
        f"output:          {out_dir}",
        f"job:             {meta.get('job_id')} (schema v{meta.get('schema_version')}, "
        f"teacher-harvest {', '.join(sorted({str(m.get('harvest_version')) for _, m in shards}))})",
        f"teacher:         {teacher.get('model')} (loaded from {teacher.get('model_root')})",
        f"tokenizer hash:  {teacher.get('tokenizer_hash') or 'unavailable'}",
        f"chat template:   {teacher.get('chat_template_hash') or 'unavailable'}",
        f"owner:           {auth.get('owner')}",
        f"licence:         {auth.get('license')}",
        f"attestation:     {auth.get('attestation')}",
    ]
    if auth.get("provider_agreement"):
        lines.append(f"provider agreement: {auth['provider_agreement']}")
    student = meta.get("student")
    if student:  # a round: the model that sampled, and who authorised it
        s_auth = meta.get("student_authorization") or {}
        lines += [
            f"student:         {student.get('model')} (loaded from {student.get('model_root')})",
            f"student owner:   {s_auth.get('owner')}, licence {s_auth.get('license')}",
        ]
    lines += [
        f"mode:            {meta.get('mode') or 'generate'}",
        f"sampling:        {meta.get('sampling')}",
        f"logprobs:        {meta.get('logprob_mode')} ({meta.get('logprob_mode_how')})",
        f"shards:          {kinds.count('data')} data, {kinds.count('failed')} failed",
        f"harvested:       {started} .. {written}",
    ]
    problems = disagreements(shards)
    lines.append("agreement:       all shards agree" if not problems else "DISAGREEMENT:")
    lines += [f"  {p}" for p in problems[:20]]
    return "\n".join(lines), not problems
