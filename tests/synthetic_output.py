"""Build harvest output folders without a teacher: shards written by the real shard writer,
committed through the real manifest, holding records shaped like the teacher's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from jobs import AUTH, model, spec

from harvest.outputs.manifest import Manifest
from schemas.records import SCHEMA_VERSION
from schemas.wire import UnitResult
from workers.shards.columns import data_columns, failure_columns, write_shard
from workers.storage import open_store

VOCAB = 1024
SPEC = spec(model("tiny"), sampling={"max_tokens": 16, "logprobs": 3})


def teacher(model_root: str = "/models/tiny", tokenizer_hash: str = "tok-a") -> dict[str, Any]:
    return {
        "model": "tiny",
        "model_root": model_root,
        "max_model_len": 1024,
        "tokenizer_hash": tokenizer_hash,
        "chat_template_hash": "tmpl-a",
    }


def record(
    rid: str,
    prompt_ids: list[int] | None,
    token_ids: list[int],
    top_ids: list[list[int]],
    top_lps: list[list[float]],
    logprobs: list[float],
    loss_mask: list[bool] | None = None,
) -> dict[str, Any]:
    return {
        "request_id": rid, "prompt_id": rid, "sample_index": 0, "api": "completions",
        "prompt": f"prompt of {rid}", "response": f"response of {rid}", "finish_reason": "length",
        "prompt_tokens": None if prompt_ids is None else len(prompt_ids),
        "completion_tokens": len(token_ids), "prompt_token_ids": prompt_ids,
        "token_ids": token_ids, "logprobs": logprobs, "top_token_ids": top_ids,
        "top_logprobs": top_lps, "loss_mask": loss_mask, "teacher": "tiny",
        "endpoint": "http://127.0.0.1:8000/v1", "attempts": 1, "latency_ms": 12.5,
    }  # fmt: skip


def random_record(rid: str, rng: np.random.Generator, k: int = 3) -> dict[str, Any]:
    """A record like a sampling teacher's: sorted top-K, the sampled token often in it."""
    p_len, r_len = int(rng.integers(1, 9)), int(rng.integers(1, 12))
    tokens, lps, tops, top_lps = [], [], [], []
    for _ in range(r_len):
        ids = [int(x) for x in rng.choice(VOCAB, size=k, replace=False)]
        probs = np.sort(rng.dirichlet(np.ones(k + 1)))[::-1][:k] * 0.9
        lp = [float(math.log(p)) for p in probs]
        pick = int(rng.integers(k + 1))
        tok, tok_lp = (ids[pick], lp[pick]) if pick < k else (int(rng.integers(VOCAB)), -9.0)
        tokens.append(tok), lps.append(tok_lp), tops.append(ids), top_lps.append(lp)
    prompt = [int(x) for x in rng.integers(3, VOCAB, size=p_len)]
    return record(rid, prompt, tokens, tops, top_lps, lps)


def write_output(
    out: Path,
    shards: list[list[dict[str, Any]]],
    *,
    k: int = 3,
    identities: list[dict[str, Any]] | None = None,
    failures: list[list[dict[str, Any]]] | None = None,
    schema: pa.Schema | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> list[Path]:
    """Write and commit one unit per entry of ``shards`` (with ``failures[i]`` as its failure
    shard, when given); return the data shard paths. ``schema`` replaces the record schema (to
    build shards of older layouts); ``extra_meta`` is added to every shard's metadata."""
    store = open_store(str(out))
    manifest = Manifest.open(store, spec=SPEC, input_fp="synthetic")
    paths = []
    for i, rows in enumerate(shards):
        unit = f"x_jsonl-00000000-{i:06d}"
        rel = f"data/part-{unit}.parquet"
        if schema is None:
            cols = data_columns(k)
            for row in rows:
                cols.append(**row)
            table = cols.table()
        else:
            table = pa.Table.from_pylist(
                [{n: r.get(n) for n in schema.names} for r in rows], schema
            )
        ident = identities[i] if identities else teacher()
        meta = {
            "schema_version": SCHEMA_VERSION, "job_id": manifest.job_id, "kind": "data",
            "teacher": ident, "sampling": SPEC.sampling.model_dump(), "unit_id": unit,
            "authorization": AUTH, **(extra_meta or {}),
        }  # fmt: skip
        sha = write_shard(table, store, rel, meta)
        fails = failures[i] if failures else []
        failed_path, failed_sha = None, None
        if fails:
            fcols = failure_columns()
            for row in fails:
                fcols.append(**row)
            failed_path = f"failed/part-{unit}.parquet"
            failed_sha = write_shard(fcols.table(), store, failed_path, {**meta, "kind": "failed"})
        manifest.commit(
            UnitResult(
                unit_id=unit, prompts=len(rows), data_rows=len(rows), failure_rows=len(fails),
                completion_tokens=sum(len(r["token_ids"]) for r in rows), data_path=rel,
                data_sha256=sha, failed_path=failed_path,
                failed_sha256=failed_sha, endpoint_requests={}, retries=0, error_classes={},
            )
        )  # fmt: skip
        paths.append(out / rel)
    return paths


def random_output(
    out: Path, rows_per_shard: list[int], seed: int = 0, prefix: str = ""
) -> list[str]:
    """An output with shards of the given sizes; returns every request id."""
    rng = np.random.default_rng(seed)
    shards = [
        [random_record(f"{prefix}s{s}-r{r}", rng) for r in range(n)]
        for s, n in enumerate(rows_per_shard)
    ]
    write_output(out, shards)
    return [row["request_id"] for rows in shards for row in rows]


def failure(prompt_id: str, error_class: str) -> dict[str, Any]:
    return {
        "request_id": f"f-{prompt_id}", "prompt_id": prompt_id, "sample_index": 0,
        "source": "x.jsonl:1", "prompt": "p", "error_class": error_class, "http_status": 400,
        "message": "rejected", "attempts": 1, "teacher": "tiny",
    }  # fmt: skip
