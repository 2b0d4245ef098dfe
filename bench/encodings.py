"""CPU and bytes of the Parquet write, per encoding option, on the same harvested answers.

Harvests ``--prompts`` answers once through the worker's own client (the real vLLM teacher at
``--url`` / ``HARVEST_TEST_TEACHER_URL``, or with ``--synthetic`` the memoised synthetic teacher
of bench/peers.py), builds the data shard's Arrow table once, then encodes it ``--repeats``
times with each option set (``pq.ParquetWriter`` keywords) and reports the median CPU time per
answer of the encoding alone (table to bytes, in memory), the file size and bytes per
(token x alternative) of the top-K columns.

    .venv/bin/python bench/encodings.py --synthetic
    HARVEST_TEST_TEACHER_URL=http://127.0.0.1:8000/v1 .venv/bin/python bench/encodings.py

``--topk-ks 20 64 128`` instead compares the top-K encodings (``output.logprob_dtype`` and
``output.topk_encoding``: float32, float16, compact) at each K: bytes per token of the top-K
columns and of the whole file, CPU of building and encoding the table, and each encoding's
error against the full-precision (float64) parsed values (largest |logprob error|, mean top-K
KL); the SmolLM2 teacher (scripts/build_smollm2.py) served with ``--max-logprobs 128``:

    .venv/bin/python bench/encodings.py --url http://127.0.0.1:8000/v1 --model smollm2 \
        --topk-ks 20 64 128 --prompts 64 --max-tokens 128 --out bench/results/topk-smollm2.json

Caveat: the synthetic teacher reuses 8 bodies and the tiny test model's logprobs are nearly
uniform, so neither compresses like a trained teacher's answers; compare options, not sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
from storage import harvest  # noqa: E402

from schemas.wire import Completion  # noqa: E402
from workers.shards.columns import compact, data_columns, parquet_options  # noqa: E402
from workers.shards.topk_codec import decode_batch, top_k_kl  # noqa: E402

LISTS = ("prompt_token_ids", "token_ids", "logprobs", "top_token_ids", "top_logprobs")
FLOATS = ("logprobs", "top_logprobs")


def leaf(schema: pa.Schema, name: str) -> str:
    """The Parquet column path of a list column's values (what per-column options take)."""
    path, t = name, schema.field(name).type
    while pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        path, t = path + ".list.element", t.value_type
    return path


def option_sets(schema: pa.Schema) -> dict[str, dict[str, Any]]:
    lists = [leaf(schema, c) for c in LISTS]
    floats = [leaf(schema, c) for c in FLOATS]
    others = [f.name for f in schema if f.name not in LISTS]
    no_dict = {"use_dictionary": others}
    return {
        "zstd (pyarrow defaults: level 1, dictionary everywhere)": {"compression": "zstd"},
        "zstd, no dictionary on list columns": {"compression": "zstd", **no_dict},
        "zstd, no dictionary on lists, byte_stream_split floats": {
            "compression": "zstd", **no_dict, "use_byte_stream_split": floats,
        },
        "zstd 3, no dictionary on lists": {
            "compression": "zstd", "compression_level": 3, **no_dict,
        },
        "zstd 3, no dictionary on lists, byte_stream_split floats": {
            "compression": "zstd", "compression_level": 3, **no_dict,
            "use_byte_stream_split": floats,
        },
        "zstd, no dictionary on lists, byte_stream_split floats and ids": {
            "compression": "zstd", **no_dict, "use_byte_stream_split": lists,
        },
        "no compression, no dictionary on lists": {"compression": None, **no_dict},
        "what harvest writes (workers/shards/columns.py parquet_options)": parquet_options(schema),
        "_lists": {"lists": lists},  # not an option set: the paths, for the record
    }  # fmt: skip


TOPK_ENCODINGS = {  # name: (output.logprob_dtype, output.topk_encoding)
    "float32": ("float32", "float32"),
    "float16": ("float16", "float32"),
    "compact": ("float32", "compact"),
}


def table_of(done: list[Completion], k: int, dtype: str = "float32", enc: str = "float32"):
    return columns_of(done, k, dtype, enc).table()


def columns_of(done: list[Completion], k: int, dtype: str = "float32", enc: str = "float32"):
    cols = data_columns(k, dtype, enc)
    for i, c in enumerate(done):
        s = compact(c.samples[0])
        cols.append(
            request_id=f"r{i:08d}", prompt_id=f"p{i}", sample_index=0, api="completions",
            prompt=f"Write about topic number {i}: ", response=s.response,
            finish_reason=s.finish_reason, prompt_tokens=c.prompt_tokens,
            completion_tokens=len(s.token_ids), prompt_token_ids=c.prompt_token_ids,
            token_ids=s.token_ids, logprobs=s.logprobs, top_token_ids=s.top_token_ids,
            top_logprobs=s.top_logprobs, teacher="t", endpoint="http://t", attempts=1,
            latency_ms=c.latency_ms,
        )  # fmt: skip
    return cols


def encode(table: pa.Table, options: dict[str, Any], rows_per_group: int) -> bytes:
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, table.schema, **options) as writer:
        for start in range(0, len(table), rows_per_group):  # row groups as the worker writes
            writer.write_table(table.slice(start, rows_per_group))
    return sink.getvalue()


def measure(table: pa.Table, options: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    cpu = []
    for _ in range(args.repeats):
        t0 = time.process_time()
        data = encode(table, options, args.rows_per_group)
        cpu.append(time.process_time() - t0)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    by_col: dict[str, int] = {}
    encodings: dict[str, list[str]] = {}
    for rg in range(meta.num_row_groups):
        for ci in range(meta.num_columns):
            col = meta.row_group(rg).column(ci)
            name = col.path_in_schema.split(".")[0]
            by_col[name] = by_col.get(name, 0) + col.total_compressed_size
            encodings[name] = sorted(set(encodings.get(name, [])) | set(col.encodings))
    tokens = sum(len(x) for x in table["token_ids"].to_pylist())
    cells = tokens * args.k
    assert pq.read_table(io.BytesIO(data)).equals(table)  # the same records, whatever the option
    return {
        "cpu_ms_per_answer_median": statistics.median(cpu) / len(table) * 1000,
        "cpu_s_all": cpu,
        "file_bytes": len(data),
        "bytes_per_token_x_alt_top_columns": (by_col["top_token_ids"] + by_col["top_logprobs"])
        / cells,
        "bytes_per_token_x_alt_whole_file": len(data) / cells,
        "column_bytes": by_col,
        "encodings": {c: encodings[c] for c in LISTS},
    }


def topk_study(done: list[Completion], k: int, args: argparse.Namespace) -> dict[str, Any]:
    """Each top-K encoding of the same answers: bytes, CPU and error."""
    samples = [compact(c.samples[0]) for c in done]
    true_ids = np.concatenate([s.top_token_ids for s in samples])
    true_lps = np.concatenate([s.top_logprobs for s in samples])
    tokens = len(true_ids)
    out: dict[str, Any] = {}
    for name, (dtype, enc) in TOPK_ENCODINGS.items():
        cpu = []
        for _ in range(args.repeats):
            t0 = time.process_time()
            cols = columns_of(done, k, dtype, enc)
            table = cols.table()
            data = encode(table, parquet_options(table.schema), args.rows_per_group)
            cpu.append(time.process_time() - t0)
        meta = pq.ParquetFile(io.BytesIO(data)).metadata
        top = 0
        for rg in range(meta.num_row_groups):
            for ci in range(meta.num_columns):
                col = meta.row_group(rg).column(ci)
                if col.path_in_schema.split(".")[0] in ("top_token_ids", "top_logprobs",
                                                        "top_k_compact"):  # fmt: skip
                    top += col.total_compressed_size
        back = decode_batch(pq.read_table(io.BytesIO(data)))
        ids = np.asarray(back["top_token_ids"].combine_chunks().flatten().flatten()).reshape(-1, k)
        lps = np.asarray(back["top_logprobs"].combine_chunks().flatten().flatten(), np.float64)
        lps = lps.reshape(-1, k)
        # Compare per (token, id): sort both sides by id (ranks within a step may differ).
        o_true, o_back = np.argsort(true_ids, axis=1), np.argsort(ids, axis=1)
        same = np.take_along_axis(true_ids, o_true, 1) == np.take_along_axis(ids, o_back, 1)
        t_l, b_l = np.take_along_axis(true_lps, o_true, 1), np.take_along_axis(lps, o_back, 1)
        out[name] = {
            "top_k_bytes_per_token": top / tokens,
            "file_bytes_per_token": len(data) / tokens,
            "cpu_us_per_token_median": statistics.median(cpu) / tokens * 1e6,
            "ids_exact": bool(same.all()),
            "max_abs_logprob_error": float(np.abs(t_l - b_l).max()),
            "mean_top_k_kl": float(top_k_kl(t_l, b_l).mean()),
            "recorded": cols.error.summary() if enc == "compact" else None,
        }
    return {"k": k, "tokens": tokens, "encodings": out}


def topk_main(args: argparse.Namespace) -> int:
    studies = []
    for k in args.topk_ks:
        args.k = k
        done = asyncio.run(harvest(args))
        studies.append(topk_study(done, k, args))
        print(f"K={k}: {studies[-1]['tokens']} tokens", flush=True)
    lines = [
        f"Teacher {args.model} ({args.url}), {args.prompts} prompts x up to {args.max_tokens} "
        f"tokens; error against the parsed float64 values.",
        "",
        "| K | encoding | top-K B/token | file B/token | CPU us/token | max abs logprob error "
        "| mean top-K KL (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    for st in studies:
        for name, r in st["encodings"].items():
            lines.append(
                f"| {st['k']} | {name} | {r['top_k_bytes_per_token']:.1f} | "
                f"{r['file_bytes_per_token']:.1f} | {r['cpu_us_per_token_median']:.1f} | "
                f"{r['max_abs_logprob_error']:.3g} | {r['mean_top_k_kl']:.3g} |"
            )
    print("\n".join(lines))
    if args.out:
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "teacher": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens,
            "rows_per_group": args.rows_per_group, "repeats": args.repeats, "studies": studies,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("HARVEST_TEST_TEACHER_URL"))
    ap.add_argument("--synthetic", action="store_true", help="the memoised synthetic teacher")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows-per-group", type=int, default=200)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--topk-ks", type=int, nargs="+", help="compare top-K encodings at these K")
    args = ap.parse_args()
    if args.topk_ks:
        if not args.url:
            raise SystemExit("--topk-ks needs a real teacher: --url or HARVEST_TEST_TEACHER_URL")
        return topk_main(args)
    teacher = None
    if args.synthetic:
        from synthetic import ProcessTeacher

        teacher = ProcessTeacher(0.0, 100_000, memoise=True)
        args.url, args.model = teacher.url, "fault"
    elif not args.url:
        raise SystemExit("set HARVEST_TEST_TEACHER_URL, pass --url, or --synthetic")
    try:
        done = asyncio.run(harvest(args))
    finally:
        if teacher:
            teacher.stop()
    table = table_of(done, args.k)
    sets = option_sets(table.schema)
    sets.pop("_lists")
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "teacher": "synthetic (memoised)" if args.synthetic else f"{args.model} (real vLLM)",
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "k": args.k,
        "rows_per_group": args.rows_per_group,
        "repeats": args.repeats,
        "options": {name: measure(table, opts, args) for name, opts in sets.items()},
    }
    lines = [
        "| options | CPU ms / answer (median) | file bytes | top-K bytes / (token x alt) |",
        "|---|---|---|---|",
    ]
    for name, r in result["options"].items():
        lines.append(
            f"| {name} | {r['cpu_ms_per_answer_median']:.3f} | {r['file_bytes']:,} | "
            f"{r['bytes_per_token_x_alt_top_columns']:.2f} |"
        )
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
