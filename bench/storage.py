"""Storage and precision of the logprob columns on a real teacher: float32 vs float16.

Harvests ``--prompts`` prompts from a real vLLM teacher (``HARVEST_TEST_TEACHER_URL`` or
``--url``; the tiny test model by default) through the worker's own client, then writes the
same records as two data shards with zstd, ``output.logprob_dtype`` float32 and float16, and
reports bytes per (token x alternative) from Parquet's column-chunk sizes and what float16
rounds away (absolute error of each logprob, alternatives whose order it would tie).

    HARVEST_TEST_TEACHER_URL=$(cat /tmp/shared_teacher_url) \\
        .venv/bin/python bench/storage.py --out bench/results/storage.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.job import parse_job
from schemas.wire import Completion, PromptRow
from workers.shards.columns import compact, data_columns, write_shard
from workers.storage import open_store
from workers.teacher.client import TeacherClient

TOP_COLUMNS = ("top_token_ids", "top_logprobs")


async def harvest(args: argparse.Namespace) -> list[Completion]:
    spec = parse_job(
        {
            "input": "x.jsonl",
            "teacher": {
                "model": args.model,
                "endpoints": [args.url],
                "authorization": {"owner": "tests", "license": "test", "attestation": "bench"},
                "timeout_s": 120.0,
            },
            "sampling": {"max_tokens": args.max_tokens, "logprobs": args.k, "seed": 7},
            "concurrency": {"in_flight_per_endpoint": 16},
        }
    )
    client = TeacherClient(spec, job_id="storage-bench")
    rows = [
        PromptRow(f"p{i}", f"bench:{i}", prompt=f"Write about topic number {i}: ")
        for i in range(args.prompts)
    ]
    try:
        return list(await asyncio.gather(*(client.complete(r) for r in rows)))
    finally:
        await client.aclose()


def shard(done: list[Completion], k: int, dtype: str, path: Path) -> dict[str, Any]:
    cols = data_columns(k, dtype)
    for i, c in enumerate(done):
        s = compact(c.samples[0])
        cols.append(
            request_id=f"r{i}", prompt_id=f"p{i}", sample_index=0, api="completions",
            prompt="x", response=s.response, finish_reason=s.finish_reason,
            prompt_tokens=c.prompt_tokens, completion_tokens=len(s.token_ids),
            prompt_token_ids=c.prompt_token_ids, token_ids=s.token_ids, logprobs=s.logprobs,
            top_token_ids=s.top_token_ids, top_logprobs=s.top_logprobs, teacher="tiny",
            attempts=c.attempts, latency_ms=c.latency_ms,
        )  # fmt: skip
    write_shard(cols.table(), open_store(str(path.parent)), path.name, {"kind": "data"}, "zstd")
    meta = pq.ParquetFile(path).metadata
    by_col: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        for ci in range(meta.num_columns):
            col = meta.row_group(rg).column(ci)
            name = col.path_in_schema.split(".")[0]
            by_col[name] = by_col.get(name, 0) + col.total_compressed_size
    return {"file_bytes": path.stat().st_size, "column_bytes": by_col}


def precision(path32: Path, path16: Path, k: int) -> dict[str, Any]:
    t32, t16 = pq.read_table(path32), pq.read_table(path16)
    a = np.array(t32["top_logprobs"].combine_chunks().flatten().flatten(), np.float64)
    b = np.array(t16["top_logprobs"].combine_chunks().flatten().flatten(), np.float64)
    err = np.abs(a - b)
    rel = err / np.maximum(np.abs(a), 1e-30)
    rows32 = a.reshape(-1, k)
    rows16 = b.reshape(-1, k)
    ties_new = int(np.sum((np.diff(rows16, axis=1) == 0) & (np.diff(rows32, axis=1) != 0)))
    p32, p16 = np.exp(rows32), np.exp(rows16)
    return {
        "values": int(a.size),
        "logprob_range": [float(a.min()), float(a.max())],
        "abs_error_max": float(err.max()),
        "abs_error_mean": float(err.mean()),
        "rel_error_max": float(rel.max()),
        "prob_mass_error_max": float(np.abs(p32.sum(1) - p16.sum(1)).max()),
        "adjacent_alternatives_newly_tied": ties_new,
        "adjacent_pairs": int(rows32.shape[0] * (k - 1)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("HARVEST_TEST_TEACHER_URL"))
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "storage.json")
    args = ap.parse_args()
    if not args.url:
        raise SystemExit("set HARVEST_TEST_TEACHER_URL or pass --url")
    t0 = time.monotonic()
    done = asyncio.run(harvest(args))
    tokens = sum(len(c.samples[0].token_ids) for c in done)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "teacher": f"{args.model} (real vLLM CPU server)",
        "prompts": args.prompts,
        "tokens": tokens,
        "k": args.k,
        "harvest_s": time.monotonic() - t0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = {d: Path(tmp) / f"{d}.parquet" for d in ("float32", "float16")}
        for dtype, path in paths.items():
            sizes = shard(done, args.k, dtype, path)
            cells = tokens * args.k
            top = sum(sizes["column_bytes"][c] for c in TOP_COLUMNS)
            result[dtype] = {
                **sizes,
                "bytes_per_token_x_alt_top_columns": top / cells,
                "bytes_per_token_x_alt_top_logprobs": sizes["column_bytes"]["top_logprobs"] / cells,
                "bytes_per_token_x_alt_whole_file": sizes["file_bytes"] / cells,
            }
        result["float16_precision"] = precision(paths["float32"], paths["float16"], args.k)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
