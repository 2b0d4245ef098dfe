"""The three contenders of bench/peers.py, each run in a child process of its own.

``python bench/peer_clients.py CONTENDER ARGS.json`` harvests the prompts in ``ARGS.json``
into Parquet under its ``out`` folder and writes ``result.json`` there. Every contender asks
for the same thing with the same sampling (temperature 1, n 1, ``max_tokens``, top K,
``return_tokens_as_token_ids`` and ``return_token_ids``) and writes the same columns:
prompt_id, prompt_token_ids, token_ids, logprobs, top_token_ids and top_logprobs (exactly K
per token, best first), response, finish_reason. A completions row goes to ``/v1/completions``
(``logprobs: K``). A chat row goes, for harvest and the bare client, to ``/tokenize`` and then
``/v1/completions``; for Ray Data LLM to ``/v1/chat/completions`` (``messages``,
``logprobs: true``, ``top_logprobs: K``), its own chat API path: Ray Data turns every answer
into Arrow, and the completions API's token-keyed ``top_logprobs`` dicts become one struct
field per distinct token id, where the chat API's lists of ``{token, logprob, bytes}`` stay
a fixed shape.

Two more apis run the score path: ``score`` (rows carry ``prompt_token_ids`` + ``token_ids``;
each is scored with ``prompt_logprobs: K``, nothing tokenised) and ``round`` (harvest only:
the same synthetic server is student and teacher; the student samples, the teacher scores).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localray import start_local_ray  # noqa: E402

MODEL = "fault"


def _rows(args: dict[str, Any]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in Path(args["prompts"]).read_bytes().splitlines()]


def _body(args: dict[str, Any], prompt: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": args["max_tokens"],
        "temperature": 1.0,
        "n": 1,
        "logprobs": args["k"],
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,
    }


def _chat_body(args: dict[str, Any], messages: Any) -> dict[str, Any]:
    """The chat API's request for the same sampling as ``_body``."""
    body = {key: v for key, v in _body(args, None).items() if key not in ("prompt", "logprobs")}
    return body | {"messages": messages, "logprobs": True, "top_logprobs": args["k"]}


def _chat_columns(answer: dict[str, Any], k: int) -> dict[str, Any]:
    """A ``/v1/chat/completions`` answer (vLLM's shape: ``logprobs.content`` a list of
    ``{token: "token_id:N", logprob, bytes, top_logprobs: [{token, logprob, bytes}] * K}``,
    ``prompt_token_ids`` with ``return_token_ids``) as the shared columns."""
    choice = answer["choices"][0]
    content = choice["logprobs"]["content"]
    top_ids, top_lps = [], []
    for entry in content:
        tops = entry["top_logprobs"][:k]  # best first, as the chat API sends them
        top_ids.append([int(t["token"][9:]) for t in tops])
        top_lps.append([t["logprob"] for t in tops])
    return {
        "prompt_token_ids": answer["prompt_token_ids"],
        "token_ids": [int(e["token"][9:]) for e in content],
        "logprobs": [e["logprob"] for e in content],
        "top_token_ids": top_ids,
        "top_logprobs": top_lps,
        "response": choice["message"]["content"],
        "finish_reason": choice["finish_reason"],
    }


def _columns(choice: dict[str, Any], k: int) -> dict[str, Any]:
    """One choice as the shared columns: what any client must do with vLLM's body."""
    lp = choice["logprobs"]
    top_ids, top_lps = [], []
    for entry in lp["top_logprobs"]:
        best = sorted(((v, t) for t, v in entry.items() if v is not None), reverse=True)[
            :k
        ]  # Ray Data fills keys seen in other rows with None
        top_ids.append([int(t[9:]) for _, t in best])
        top_lps.append([v for v, _ in best])
    return {
        "prompt_token_ids": choice["prompt_token_ids"],
        "token_ids": [int(t[9:]) for t in lp["tokens"]],
        "logprobs": lp["token_logprobs"],
        "top_token_ids": top_ids,
        "top_logprobs": top_lps,
        "response": choice["text"],
        "finish_reason": choice["finish_reason"],
    }


def schema(k: int) -> pa.Schema:
    return pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt_token_ids", pa.list_(pa.int32())),
            ("token_ids", pa.list_(pa.int32())),
            ("logprobs", pa.list_(pa.float32())),
            ("top_token_ids", pa.list_(pa.list_(pa.int32(), k))),
            ("top_logprobs", pa.list_(pa.list_(pa.float32(), k))),
            ("response", pa.string()),
            ("finish_reason", pa.string()),
        ]
    )


# ---- bare asyncio + aiohttp ------------------------------------------------------------------


async def _bare(args: dict[str, Any], out: Path) -> None:
    import aiohttp

    base, k = args["url"], args["k"]
    rows = _rows(args)
    sem = asyncio.Semaphore(args["in_flight"])
    got: list[dict[str, Any]] = []
    conn = aiohttp.TCPConnector(limit=args["in_flight"])
    async with aiohttp.ClientSession(connector=conn) as session:

        async def post(url: str, body: dict[str, Any]) -> Any:
            async with session.post(
                url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
            ) as resp:
                resp.raise_for_status()
                return orjson.loads(await resp.read())

        async def one(row: dict[str, Any]) -> None:
            async with sem:
                prompt = row.get("prompt")
                if prompt is None:
                    tok = {"model": MODEL, "messages": row["messages"]}
                    tok["add_generation_prompt"] = True
                    prompt = (await post(base.removesuffix("/v1") + "/tokenize", tok))["tokens"]
                answer = await post(base + "/completions", _body(args, prompt))
            got.append({"prompt_id": row["id"], **_columns(answer["choices"][0], k)})

        async with asyncio.TaskGroup() as group:
            for row in rows:
                group.create_task(one(row))
    table = pa.Table.from_pylist(got, schema=schema(k))
    pq.write_table(table, out / "part-0.parquet", compression="zstd")


def _scored_columns(choice: dict[str, Any], ids: list[int], start: int, k: int) -> dict[str, Any]:
    """A score answer as the shared columns: the response tokens' logprobs and top K."""
    lps, top_ids, top_lps = [], [], []
    for entry, actual in zip(choice["prompt_logprobs"][start:], ids[start:], strict=True):
        lps.append(entry[str(actual)]["logprob"])
        alts = [
            (v["logprob"], int(t)) for t, v in entry.items() if len(entry) == k or int(t) != actual
        ]
        alts.sort(key=lambda a: (-a[0], a[1]))
        top_ids.append([t for _, t in alts[:k]])
        top_lps.append([v for v, _ in alts[:k]])
    return {
        "prompt_token_ids": ids[:start], "token_ids": ids[start:], "logprobs": lps,
        "top_token_ids": top_ids, "top_logprobs": top_lps, "response": "",
        "finish_reason": "score",
    }  # fmt: skip


async def _bare_score(args: dict[str, Any], out: Path) -> None:
    """The score path of a bare client: ids to /v1/completions, orjson, dicts, Parquet."""
    import aiohttp

    base, k = args["url"], args["k"]
    sem = asyncio.Semaphore(args["in_flight"])
    got: list[dict[str, Any]] = []
    conn = aiohttp.TCPConnector(limit=args["in_flight"])
    async with aiohttp.ClientSession(connector=conn) as session:

        async def one(row: dict[str, Any]) -> None:
            ids = row["prompt_token_ids"] + row["token_ids"]
            body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "prompt_logprobs": k}
            async with sem, session.post(
                base + "/completions", data=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            ) as resp:  # fmt: skip
                resp.raise_for_status()
                answer = orjson.loads(await resp.read())
            start = len(row["prompt_token_ids"])
            got.append(
                {"prompt_id": row["id"], **_scored_columns(answer["choices"][0], ids, start, k)}
            )

        async with asyncio.TaskGroup() as group:
            for row in _rows(args):
                group.create_task(one(row))
    pq.write_table(pa.Table.from_pylist(got, schema=schema(k)), out / "part-0.parquet")


# ---- Ray Data LLM's HTTP processor -------------------------------------------------------------


def _raydata(args: dict[str, Any], out: Path) -> None:
    """Ray Data LLM's ``HttpRequestProcessorConfig``: completions rows to ``/v1/completions``,
    chat rows straight to ``/v1/chat/completions`` (no ``/tokenize``)."""
    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    start_local_ray()
    base, k = args["url"], args["k"]
    ds = ray.data.from_items(_rows(args))
    conf = {"batch_size": args["batch_size"], "concurrency": args["ray_concurrency"]}
    if args["api"] == "chat":
        chat = build_processor(
            HttpRequestProcessorConfig(url=base + "/chat/completions", **conf),
            preprocess=lambda r: {"payload": _chat_body(args, _plain(r["messages"]))},
            postprocess=lambda r: {"prompt_id": r["id"], **_chat_columns(r["http_response"], k)},
        )
        chat(ds).write_parquet(str(out))
        ray.shutdown()
        return
    generate = build_processor(
        HttpRequestProcessorConfig(url=base + "/completions", **conf),
        preprocess=lambda r: {"payload": _body(args, _plain(r["prompt"]))},
        postprocess=lambda r: {
            "prompt_id": r["id"],
            **_columns(r["http_response"]["choices"][0], k),
        },
    )
    generate(ds).write_parquet(str(out))
    ray.shutdown()


def _plain(value: Any) -> Any:
    """Ray Data hands list columns back as numpy arrays; JSON wants lists of plain values."""
    if isinstance(value, str | dict):
        return value
    return [v if isinstance(v, dict) else int(v) for v in value]


# ---- harvest: the real scheduler on a local Ray cluster ---------------------------------------


def _harvest(args: dict[str, Any], out: Path, transport: str = "aiohttp") -> None:
    import ray

    from harvest.driver.options import RunOptions
    from harvest.driver.scheduler import run_job
    from schemas.job import parse_job

    os.environ.setdefault("RAY_worker_niceness", "0")  # as `harvest run`'s private cluster
    start_local_ray()
    model = {
        "model": MODEL,
        "endpoints": [args["url"]],
        "authorization": {"owner": "bench", "license": "test", "attestation": "synthetic"},
        "timeout_s": 120.0,
        "transport": transport,
    }
    mode = {"score": {"mode": "score"}, "round": {"mode": "round", "student": model}}
    sampling = {"max_tokens": args["max_tokens"], "n": 1, "logprobs": args["k"]}
    if args["api"] == "score":
        sampling = {"logprobs": args["k"]}
    spec = parse_job(
        {
            **mode.get(args["api"], {}),
            "input": args["prompts"],
            "teacher": model,
            "sampling": sampling,
            "output": {"dir": str(out), **args.get("output", {})},
            "concurrency": {
                "workers": args["workers"],
                "in_flight_per_endpoint": args["in_flight"],
            },
        },
        "peers bench",
    )
    summary = run_job(spec, out, options=RunOptions(show_progress=False))
    if summary.failure_rows:
        raise RuntimeError(f"harvest wrote {summary.failure_rows} failure rows")
    ray.shutdown()


def main(argv: list[str]) -> int:
    contender, args = argv[0], json.loads(Path(argv[1]).read_text())
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if contender == "bare" and args["api"] == "score":
        asyncio.run(_bare_score(args, out))
    elif contender == "bare":
        asyncio.run(_bare(args, out))
    elif contender == "raydata":
        _raydata(args, out)
    elif contender == "harvest":
        _harvest(args, out)
    elif contender == "harvest-httpx":
        _harvest(args, out, "httpx")
    else:
        raise SystemExit(f"unknown contender {contender!r}")
    (out / "result.json").write_text(json.dumps({"wall_s": time.monotonic() - started}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
