"""The two contenders of bench/saturation.py, each run in a child process of its own.

``python bench/saturation_clients.py CONTENDER ARGS.json`` harvests the prompts in ``ARGS.json``
from a real vLLM server and writes Parquet and ``result.json`` under its ``out`` folder.

Both ask exactly the same work: harvest's ``/v1/completions`` body (``CompletionRequest.body``:
model, max_tokens, temperature, top_p, n, logprobs, seed, return_tokens_as_token_ids,
return_token_ids, prompt), with a fixed seed so the same prompt yields the same tokens on both
sides; the caller checks that the token totals agree.

- ``bare``: one asyncio process, aiohttp, ``in_flight`` requests at once, orjson, every row in
  memory, one zstd Parquet file at the end (the columns of bench/peer_clients.py);
- ``harvest``: the real scheduler (``run_job``) on a local Ray cluster, configured by ``args``
  (workers, rows_per_shard, transport, worker_cpus, niceness; ``share_caps=0`` keeps each
  worker's even share of the in-flight cap to the end, as before ``Pool.share_caps``).

Each contender records the wall time of its first and last response (``first_s``/``last_s``,
from its own start), so the caller can take start-up out.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from localray import start_local_ray  # noqa: E402
from peer_clients import _columns, schema  # noqa: E402

AUTH = {"owner": "bench", "license": "test", "attestation": "our own test model"}


def job(args: dict[str, Any], out: Path) -> dict[str, Any]:
    """The harvest job; ``body`` below is what its client sends for each row."""
    teacher: dict[str, Any] = {
        "model": args["model"],
        "endpoints": [args["url"]],
        "authorization": AUTH,
        "timeout_s": 300.0,
    }
    if args.get("transport"):  # else the job's default
        teacher["transport"] = args["transport"]
    output: dict[str, Any] = {"dir": str(out)}
    if args.get("rows_per_shard"):
        output["rows_per_shard"] = args["rows_per_shard"]
    concurrency: dict[str, Any] = {"in_flight_per_endpoint": args["in_flight"]}
    for key in ("workers", "worker_cpus"):
        if args.get(key):
            concurrency[key] = args[key]
    return {
        "input": args["prompts"],
        "teacher": teacher,
        "sampling": {
            "max_tokens": args["max_tokens"],
            "n": 1,
            "logprobs": args["k"],
            "temperature": args["temperature"],
            "seed": args["seed"],
        },
        "output": output,
        "concurrency": concurrency,
    }


def body(args: dict[str, Any], prompt: str) -> dict[str, Any]:
    """Field for field what ``CompletionRequest.body`` sends for a completions row of ``job``."""
    return {
        "model": args["model"],
        "max_tokens": args["max_tokens"],
        "temperature": args["temperature"],
        "top_p": 1.0,
        "n": 1,
        "logprobs": args["k"],
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,
        "seed": args["seed"],
        "prompt": prompt,
    }


async def _bare(args: dict[str, Any], out: Path, t0: float) -> dict[str, Any]:
    import aiohttp

    rows = [orjson.loads(line) for line in Path(args["prompts"]).read_bytes().splitlines()]
    sem = asyncio.Semaphore(args["in_flight"])
    got: list[dict[str, Any]] = []
    stamps: list[float] = []
    retries: list[int] = []
    url = args["url"] + "/completions"
    conn = aiohttp.TCPConnector(limit=args["in_flight"])
    async with aiohttp.ClientSession(connector=conn) as session:

        async def post_once(data: bytes) -> Any:
            headers = {"Content-Type": "application/json"}
            async with session.post(url, data=data, headers=headers) as resp:
                resp.raise_for_status()
                return orjson.loads(await resp.read())

        async def post(data: bytes) -> Any:
            for attempt in range(2):  # the server closed a kept-alive connection: a new one
                try:
                    return await post_once(data)
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    retries.append(attempt)
            return await post_once(data)

        async def one(row: dict[str, Any]) -> None:
            async with sem:
                answer = await post(orjson.dumps(body(args, row["prompt"])))
            stamps.append(time.monotonic() - t0)
            got.append({"prompt_id": row["id"], **_columns(answer["choices"][0], args["k"])})

        async with asyncio.TaskGroup() as group:
            for row in rows:
                group.create_task(one(row))
    table = pa.Table.from_pylist(got, schema=schema(args["k"]))
    pq.write_table(table, out / "part-0.parquet", compression="zstd")
    return {"first_s": min(stamps), "last_s": max(stamps), "bare_reconnects": len(retries)}


def _harvest(args: dict[str, Any], out: Path, t0: float) -> dict[str, Any]:
    # Ray's default for its workers is 15; `harvest run` starts its private cluster at 0
    # (harvest.driver.cluster.init_ray), and so does this contender unless told otherwise.
    niceness = args.get("niceness")
    os.environ["RAY_worker_niceness"] = str(0 if niceness is None else niceness)  # noqa: SIM112
    import ray

    from harvest.driver.options import RunOptions
    from harvest.driver.pool import Pool
    from harvest.driver.scheduler import run_job

    if args.get("share_caps") == 0:  # as before: each worker keeps in_flight / workers
        Pool.share_caps = lambda self: None  # type: ignore[method-assign]
    from schemas.job import parse_job

    start_local_ray()
    ray_up = time.monotonic() - t0
    spec = parse_job(job(args, out / "data"), "saturation bench")
    summary = run_job(spec, out / "data", options=RunOptions(show_progress=False))
    if summary.failure_rows:
        raise RuntimeError(f"harvest wrote {summary.failure_rows} failure rows")
    done = time.monotonic() - t0
    ray.shutdown()
    return {"ray_init_s": ray_up, "run_job_s": summary.elapsed_s, "run_job_end_s": done}


def main(argv: list[str]) -> int:
    contender, args = argv[0], json.loads(Path(argv[1]).read_text())
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if contender == "bare":
        extra = asyncio.run(_bare(args, out, t0))
    elif contender == "harvest":
        extra = _harvest(args, out, t0)
    else:
        raise SystemExit(f"unknown contender {contender!r}")
    result = {"wall_s": time.monotonic() - t0, **extra}
    (out / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
