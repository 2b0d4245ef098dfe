"""Harvest against its peers, in the same run, on the same synthetic vLLM-shaped teacher.

Contenders (bench/peer_clients.py, each in a child process that starts its own Ray cluster if
it uses one): ``harvest`` (the real scheduler, ``run_job``, on a local Ray cluster), ``bare``
(one asyncio process with aiohttp, writing the same columns to Parquet) and ``raydata`` (Ray Data
LLM's ``HttpRequestProcessorConfig`` pipeline, post-processed into the same columns, stopped at
``--cap-s`` and then reported as "did not finish"). Chat rows: harvest and bare ask
``/tokenize`` and then ``/v1/completions``; Ray Data posts them to ``/v1/chat/completions``
(``messages``, ``logprobs: true``, ``top_logprobs: K``), its own chat API path.

The teacher is ``tests/fault_teacher_server.py`` with no latency or faults, answering vLLM 0.32
bodies (``token_id:N`` tokens, K+1 alternatives when the sampled token is outside the top K,
``token_ids``/``prompt_token_ids``; the same answers in vLLM's chat shape on
``/v1/chat/completions``) from a memo (bench/synthetic.py ``memoise_answers``), so it costs
little CPU. Its CPU is not counted; everything in a contender's process tree is.

Each contender runs at two input sizes; "marginal" figures are the differences between them,
so start-up (Ray's above all) is not counted. Run order interleaves the contenders.

    .venv/bin/python bench/peers.py                # the full study (~10 min on 2 cores)
    .venv/bin/python bench/peers.py --quick        # smoke run (~2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from report import commit, machine, save  # noqa: E402
from synthetic import ProcessTeacher, _cpu_times  # noqa: E402
from treeprobe import TreeProbe  # noqa: E402

CONTENDERS = ("harvest", "harvest-httpx", "bare", "raydata")
# The score path (bench/peer_clients.py): which contenders run it.
SCORE_APIS = {"score": ("harvest", "harvest-httpx", "bare"), "round": ("harvest", "harvest-httpx")}
PROMPT_IDS = 16  # score rows: this many prompt ids, then max_tokens response ids


def runs_api(contender: str, api: str) -> bool:
    return api not in SCORE_APIS or contender in SCORE_APIS[api]


def write_prompts(path: Path, api: str, count: int, max_tokens: int = 256) -> None:
    with open(path, "wb") as fh:
        for i in range(count):
            if api == "score":  # ids to score as given, in a 32,000-id vocabulary
                ids = [(i * 7919 + j * 104729) % 32_000 for j in range(PROMPT_IDS + max_tokens)]
                row = {"id": f"score-{i}", "prompt_token_ids": ids[:PROMPT_IDS]}
                fh.write(json.dumps({**row, "token_ids": ids[PROMPT_IDS:]}).encode() + b"\n")
                continue
            text = f"peers {api} prompt {i}: tell me about the number {i}"
            row: dict[str, Any] = {"id": f"{api}-{i}"}
            if api == "chat":
                row["messages"] = [{"role": "user", "content": text}]
            else:
                row["prompt"] = text
            fh.write(json.dumps(row).encode() + b"\n")


def count_output(out: Path) -> tuple[int, int]:
    """(rows, completion tokens) in the Parquet files under ``out``; checks exactly K per token."""
    rows = tokens = 0
    for f in sorted(out.rglob("*.parquet")):
        if "failed" in f.parts or "_harvest" in f.parts:
            continue
        t = pq.read_table(f, columns=["prompt_id", "token_ids"])
        rows += t.num_rows
        tokens += sum(len(x) for x in t.column("token_ids").to_pylist())
    return rows, tokens


def run_one(
    contender: str, api: str, prompts: int, args: argparse.Namespace, url: str, work: Path
) -> dict[str, Any]:
    folder = work / f"{contender}-{api}-{prompts}"
    folder.mkdir(parents=True)
    write_prompts(folder / "prompts.jsonl", api, prompts, args.max_tokens)
    conf = {
        "url": url,
        "api": api,
        "prompts": str(folder / "prompts.jsonl"),
        "out": str(folder / "out"),
        "max_tokens": args.max_tokens,
        "k": args.k,
        "in_flight": args.in_flight,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "ray_concurrency": args.ray_concurrency,
    }
    (folder / "args.json").write_text(json.dumps(conf))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(BENCH.parent)}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="pr", dir="/tmp")  # AF_UNIX paths: <= 107 B
    busy0 = _cpu_times()
    t0 = time.monotonic()
    log = open(folder / "log.txt", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "peer_clients.py"), contender, str(folder / "args.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    probe = TreeProbe(proc.pid).start()
    finished = True
    try:
        proc.wait(args.cap_s)
    except subprocess.TimeoutExpired:
        finished = False
    probe.stop()
    probe.sample()
    wall = time.monotonic() - t0
    if not finished:
        _end_tree(proc, probe)
    log.close()
    busy1 = _cpu_times()
    cpus = os.cpu_count() or 1
    machine_busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    cpu = probe.cpu_by_kind()
    rows, tokens = count_output(folder / "out") if finished and proc.returncode == 0 else (0, 0)
    res = {
        "contender": contender,
        "api": api,
        "prompts": prompts,
        "finished": finished and proc.returncode == 0 and rows == prompts,
        "returncode": proc.returncode,
        "wall_s": wall,
        "rows": rows,
        "tokens": tokens,
        "cpu_s": sum(cpu.values()),
        "cpu_by_kind": cpu,
        "peak_rss_mb_by_kind": {k: v / 2**20 for k, v in probe.peak_rss.items()},
        "peak_rss_mb_total": probe.peak_total_rss / 2**20,
        "machine_busy_cores": machine_busy * cpus,
    }
    if not res["finished"]:
        res["log_tail"] = (folder / "log.txt").read_text(errors="replace")[-1500:]
    return res


def _end_tree(proc: subprocess.Popen[bytes], probe: TreeProbe) -> None:
    """Stop a contender past its cap: its own process and every process of its tree, by pid."""
    pids = set(probe.pids())
    try:
        pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.Error:
        pass
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            continue
    proc.wait(30)


def _key(run: dict[str, Any]) -> tuple[str, str]:
    return run["api"], run["contender"]


MEDIANS = ("marginal_tok_per_cpu_s", "marginal_tok_per_wall_s", "e2e_tok_per_wall_s", "cpu_s")


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (api, contender): the median over repeats of each repeat's marginal
    figures (each repeat's own values kept beside it), the largest peaks; then the ratios."""
    repeats = sorted({r.get("repeat", 0) for r in runs})
    per = [_pairs([r for r in runs if r.get("repeat", 0) == i]) for i in repeats]
    lines = []
    for first in per[0]:
        mine = [x for p in per for x in p if _key(x) == _key(first)]
        line = dict(first)
        line["repeats"] = len(mine)
        line["finished"] = all(x["finished"] for x in mine)
        line["peak_rss_mb_total"] = max(x["peak_rss_mb_total"] for x in mine)
        for key in MEDIANS:
            values = [x[key] for x in mine if key in x]
            if values:
                line[key] = statistics.median(values)
                line[f"{key}_each"] = values
        lines.append(line)
    for line in lines:  # ratios of the medians against the peers of the same api
        base = {x["contender"]: x for x in lines if x["api"] == line["api"]}
        for peer in ("raydata", "bare"):
            p = base.get(peer)
            for key in ("marginal_tok_per_cpu_s", "marginal_tok_per_wall_s"):
                if p and key in line and key in p:
                    line[f"{key}_vs_{peer}"] = line[key] / p[key]
    return lines


def _pairs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One repeat: per (api, contender), the marginal figures of its small and large run."""
    lines = []
    for api in sorted({r["api"] for r in runs}):
        for c in CONTENDERS:
            mine = sorted((r for r in runs if _key(r)[:2] == (api, c)), key=lambda r: r["prompts"])
            if len(mine) != 2:
                continue
            s, big = mine
            line: dict[str, Any] = {"api": api, "contender": c, "finished": big["finished"]}
            line["peak_rss_mb_total"] = max(s["peak_rss_mb_total"], big["peak_rss_mb_total"])
            line["peak_rss_mb_by_kind"] = big["peak_rss_mb_by_kind"]
            line["other_load_cores"] = big["machine_busy_cores"]
            if s["finished"] and big["finished"] and big["cpu_s"] - s["cpu_s"] < 0.2:
                line["note"] = "sizes too close to tell a marginal cost (CPU differs < 0.2 s)"
                line["e2e_tok_per_wall_s"] = big["tokens"] / big["wall_s"]
            elif s["finished"] and big["finished"]:
                d_tok = big["tokens"] - s["tokens"]
                line["marginal_tok_per_cpu_s"] = d_tok / max(1e-9, big["cpu_s"] - s["cpu_s"])
                line["marginal_tok_per_wall_s"] = d_tok / max(1e-9, big["wall_s"] - s["wall_s"])
                line["e2e_tok_per_wall_s"] = big["tokens"] / big["wall_s"]
                line["cpu_s"] = big["cpu_s"]
            else:
                line["note"] = (
                    f"did not finish {big['prompts'] if not big['finished'] else s['prompts']} "
                    f"prompts within {big['wall_s']:.0f} s cap"
                )
                if s["finished"]:
                    line["e2e_tok_per_wall_s"] = s["tokens"] / s["wall_s"]
            lines.append(line)
    return lines


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    out = [
        f"# Peers: harvest vs a bare aiohttp client vs Ray Data LLM ({result['date']})",
        "",
        f"Synthetic vLLM-shaped teacher (instant, memoised bodies, vocab 32,000), "
        f"{cfg['max_tokens']} tokens, top-{cfg['k']}, {cfg['in_flight']} in flight, harvest "
        f"with {cfg['workers']} workers; Ray Data batch {cfg['batch_size']}, concurrency "
        f"{cfg['ray_concurrency']}, cap {cfg['cap_s']:.0f} s. Sizes {cfg['sizes'][0]} and "
        f"{cfg['sizes'][1]} prompts (Ray Data: {cfg['raydata_sizes'][0]} and "
        f"{cfg['raydata_sizes'][1]}); marginal = difference between them. CPU of every process "
        "of a contender (Ray's included), teacher excluded. "
        f"{cfg.get('repeat', 1)} repeat(s), interleaved: figures are medians, each repeat's "
        "own value in brackets. Command: "
        f"`{result['command']}`.",
        "",
        "| api | contender | marginal tok/CPU-s | marginal tok/s (wall) | e2e tok/s | "
        "peak RSS MB (all) | peak RSS by kind (MB) | machine busy (cores) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ln in result["summary"]:
        kinds = ", ".join(f"{k} {v:.0f}" for k, v in sorted(ln["peak_rss_mb_by_kind"].items()))

        def num(key: str, line: dict[str, Any] = ln) -> str:
            if key not in line:
                return "-"
            each = line.get(f"{key}_each", [])
            tail = " (" + "; ".join(f"{v:,.0f}" for v in each) + ")" if len(each) > 1 else ""
            return f"{line[key]:,.0f}{tail}"

        out.append(
            f"| {ln['api']} | {ln['contender']} | {num('marginal_tok_per_cpu_s')} | "
            f"{num('marginal_tok_per_wall_s')} | {num('e2e_tok_per_wall_s')} | "
            f"{ln['peak_rss_mb_total']:,.0f} | {kinds} | {ln['other_load_cores']:.2f} | "
            f"{ln.get('note', '')} |"
        )
    out += ["", "Ratios (harvest / peer, same api, same run):", ""]
    for ln in result["summary"]:
        if not ln["contender"].startswith("harvest"):
            continue
        for peer in ("raydata", "bare"):
            r = [
                f"{key.split('_')[3]} x{ln[f'{key}_vs_{peer}']:.2f}"
                for key in ("marginal_tok_per_cpu_s", "marginal_tok_per_wall_s")
                if f"{key}_vs_{peer}" in ln
            ]
            out.append(
                f"- {ln['api']}, {ln['contender']} vs {peer}: " + (", ".join(r) or "not comparable")
            )
    out += [
        "",
        "Machine busy = all CPU use of the machine during the large run, in cores (2 = full); "
        "it includes the contender, the teacher and other users' processes.",
    ]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, short cap")
    ap.add_argument("--sizes", type=int, nargs=2, default=(400, 2000))
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ray-concurrency", type=int, default=2)
    ap.add_argument(
        "--raydata-sizes", type=int, nargs=2, default=(16, 64),
        help="Ray Data's own sizes: it is 20-1,000x slower here, the rates are comparable",
    )  # fmt: skip
    ap.add_argument("--cap-s", type=float, default=240.0)
    ap.add_argument(
        "--repeat", type=int, default=1,
        help="run every size of every contender this many times (interleaved); report medians",
    )  # fmt: skip
    ap.add_argument(
        "--apis", nargs="+", default=["completions", "chat"],
        choices=["completions", "chat", "score", "round"],
        help="score: rows of ids scored with prompt_logprobs; round: student samples, teacher "
        "scores (the same synthetic server plays both)",
    )  # fmt: skip
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "peers.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.max_tokens, args.cap_s = (20, 100), 64, 60.0
        args.raydata_sizes = (10, 30)
        if args.out == BENCH / "results" / "peers.json":
            args.out = BENCH / "results" / "peers-quick.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = tuple(args.sizes)
    teacher = ProcessTeacher(0.0, 100_000, memoise=True)
    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
            for rep in range(args.repeat):
                for i in (0, 1):
                    for api in args.apis:
                        for c in args.contenders:
                            if not runs_api(c, api):
                                continue
                            size = (args.raydata_sizes if c == "raydata" else sizes)[i]
                            work = Path(tmp) / f"repeat-{rep}"
                            work.mkdir(exist_ok=True)
                            r = run_one(c, api, size, args, teacher.url, work)
                            r["repeat"] = rep
                            runs.append(r)
                            print(
                                f"[{rep}] {c:8s} {api:11s} {size:5d}: finished={r['finished']} "
                                f"wall {r['wall_s']:.1f}s cpu {r['cpu_s']:.1f}s "
                                f"tokens {r['tokens']}",
                                flush=True,
                            )
    finally:
        teacher.stop()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "commit": commit(),
        "config": {
            "sizes": sizes,
            "raydata_sizes": tuple(args.raydata_sizes),
            "max_tokens": args.max_tokens,
            "k": args.k,
            "in_flight": args.in_flight,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "ray_concurrency": args.ray_concurrency,
            "cap_s": args.cap_s,
            "repeat": args.repeat,
        },
        "summary": summarise(runs),
        "runs": runs,
    }
    save(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
