"""CPU and bytes of the Parquet write, per encoding option, on the same harvested answers.

Harvests ``--prompts`` answers once through the worker's own client (the real vLLM teacher at
``--url`` / ``HARVEST_TEST_TEACHER_URL``, or with ``--synthetic`` the memoised synthetic teacher
of bench/peers.py), builds the data shard's Arrow table once, then encodes it ``--repeats``
times with each option set (``pq.ParquetWriter`` keywords) and reports the median CPU time per
answer of the encoding alone (table to bytes, in memory), the file size and bytes per
(token x alternative) of the top-K columns.

    .venv/bin/python bench/encodings.py --synthetic
    HARVEST_TEST_TEACHER_URL=http://127.0.0.1:8000/v1 .venv/bin/python bench/encodings.py

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

from storage import harvest  # noqa: E402

from schemas.wire import Completion  # noqa: E402
from workers.shards.columns import compact, data_columns, parquet_options  # noqa: E402

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


def table_of(done: list[Completion], k: int) -> pa.Table:
    cols = data_columns(k)
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
    return cols.table()


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
    args = ap.parse_args()
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
