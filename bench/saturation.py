"""Teacher saturation: does harvest keep a real vLLM server as busy as a bare client does?

Starts one real vLLM CPU server (the tests' tiny random Llama, or ``--url`` of one already
running), then alternates the contenders for ``--rounds`` rounds (the order flips every round),
each in a child process of its own (bench/saturation_clients.py) asking the same completions
(same body, fixed seed, ``--max-tokens`` tokens, top-``--k``, ``--in-flight`` at once):

- ``bare``: one asyncio + aiohttp process, orjson, one Parquet file at the end;
- ``harvest``: the real scheduler (``run_job``) on a local Ray cluster, job defaults, Ray's
  workers at nice 0 as ``harvest run`` starts them;
- ``harvest:KEY=VAL,...``: the same with workers, rows_per_shard, transport, worker_cpus,
  niceness (of Ray's workers) or share_caps=0 (each worker keeps its even share of the
  in-flight cap, as before ``harvest.driver.pool.Pool.share_caps``), e.g. ``harvest:niceness=0``.

Throughput is reported three ways: end to end (tokens / the child's wall time: Ray's start-up
included), active and steady from the server's own ``/metrics`` (generated tokens between the
first and last token; between 10% and 90% of them, no ramp-up or tail), with the requests the
server ran at once. CPU: every process of a contender's tree (bench/treeprobe.py), the vLLM
server's tree, and the whole machine.

    .venv/bin/python bench/saturation.py                       # ~6 min: 2 rounds, 1,500 prompts
    .venv/bin/python bench/saturation.py --contenders bare harvest 'harvest:rows_per_shard=250'
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

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from peers import count_output  # noqa: E402
from report import commit, machine, save  # noqa: E402
from synthetic import _cpu_times  # noqa: E402
from treeprobe import TreeProbe  # noqa: E402
from vllm_metrics import MetricsProbe, analyse, server_tree, tree_cpu  # noqa: E402

TINY = ROOT / "tests" / "data" / "tiny-llama"
TINY_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
KNOBS = {"workers": int, "rows_per_shard": int, "transport": str, "worker_cpus": float}
KNOBS |= {"niceness": int, "share_caps": int}


def contender_args(name: str) -> tuple[str, dict[str, Any]]:
    """``harvest:rows_per_shard=250,transport=aiohttp`` -> ("harvest", {...})."""
    kind, _, rest = name.partition(":")
    knobs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in KNOBS or kind != "harvest":
            raise SystemExit(f"unknown setting {key!r} for {kind!r}; known: {sorted(KNOBS)}")
        knobs[key] = KNOBS[key](value)
    return kind, knobs


def write_prompts(path: Path, count: int) -> None:
    with open(path, "w") as fh:
        for i in range(count):
            text = f"Saturation prompt {i}: tell me a story about the number {i}."
            fh.write(json.dumps({"id": f"p{i}", "prompt": text}) + "\n")


def run_one(name: str, rnd: int, args: argparse.Namespace, url: str, work: Path) -> dict[str, Any]:
    kind, knobs = contender_args(name)
    folder = work / f"r{rnd}-{name.replace(':', '-').replace(',', '-').replace('=', '')}"
    folder.mkdir(parents=True)
    conf = {
        "url": url,
        "model": args.model,
        "prompts": str(work / "prompts.jsonl"),
        "out": str(folder / "out"),
        "max_tokens": args.max_tokens,
        "k": args.k,
        "in_flight": args.in_flight,
        "seed": args.seed,
        "temperature": args.temperature,
        **knobs,
    }
    (folder / "args.json").write_text(json.dumps(conf))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="sat", dir="/tmp")  # AF_UNIX paths: <= 107 B
    server = server_tree(httpx.URL(url).port or 80)
    waited = wait_quiet(server, args.wait_idle)
    server_cpu0, busy0 = tree_cpu(server), _cpu_times()
    metrics = MetricsProbe(url.removesuffix("/v1"), server=server).start()
    t0 = time.monotonic()
    with open(folder / "log.txt", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / "saturation_clients.py"), kind, str(folder / "args.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        probe = TreeProbe(proc.pid).start()
        proc.wait()
    wall = time.monotonic() - t0
    probe.stop()
    probe.sample()
    metrics.stop()
    busy1 = _cpu_times()
    ok = proc.returncode == 0
    rows, tokens = count_output(folder / "out") if ok else (0, 0)
    cpu = probe.cpu_by_kind()
    res: dict[str, Any] = {
        "contender": name,
        "round": rnd,
        "ok": ok and rows == args.prompts,
        "wall_s": wall,
        "rows": rows,
        "tokens": tokens,
        "e2e_tok_s": tokens / wall,
        "cpu_s": sum(cpu.values()),
        "cpu_by_kind": cpu,
        "server_cpu_s": tree_cpu(server) - server_cpu0,
        "machine_busy_cores": (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * os.cpu_count(),
        "waited_for_quiet_s": waited,
        **analyse(metrics, t0, args.in_flight),
    }
    if "steady_t10" in res:  # where the contender's CPU goes while the teacher is saturated
        res["cores_steady_by_kind"] = probe.cores_between(res["steady_t10"], res["steady_t90"])
    # What the rest of the machine used meanwhile (other processes), in cores.
    res["other_cores"] = res["machine_busy_cores"] - (res["cpu_s"] + res["server_cpu_s"]) / wall
    if ok:
        res.update(json.loads((folder / "out" / "result.json").read_text()))
    else:
        res["log_tail"] = (folder / "log.txt").read_text(errors="replace")[-1500:]
    return res


def wait_quiet(server: Any, max_wait_s: float, below: float = 0.3, window_s: float = 3.0) -> float:
    """Wait (at most ``max_wait_s``) for a window in which processes other than the vLLM
    server use under ``below`` cores: on a shared machine, runs start in quiet spells."""
    started = time.monotonic()
    while max_wait_s > 0:
        c0, b0 = tree_cpu(server), _cpu_times()
        time.sleep(window_s)
        c1, b1 = tree_cpu(server), _cpu_times()
        cores = (b1[0] - b0[0]) / max(1, b1[1] - b0[1]) * (os.cpu_count() or 1)
        if cores - (c1 - c0) / window_s < below or time.monotonic() - started >= max_wait_s:
            break
    return time.monotonic() - started


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per contender: medians over rounds; ratios to bare per round and of the medians."""
    keys = ("e2e_tok_s", "active_tok_s", "steady_tok_s", "cpu_s", "server_cpu_s")
    keys += ("running_mean_steady", "running_mean_active", "machine_busy_cores", "wall_s")
    keys += ("other_cores",)
    out: dict[str, Any] = {}
    bare = {r["round"]: r for r in runs if r["contender"] == "bare" and r["ok"]}
    for name in dict.fromkeys(r["contender"] for r in runs):
        mine = [r for r in runs if r["contender"] == name and r["ok"]]
        line: dict[str, Any] = {"rounds": len(mine)}
        for key in keys:
            values = [r[key] for r in mine if key in r]
            if values:
                line[key] = statistics.median(values)
        if name != "bare":
            for key in ("e2e_tok_s", "active_tok_s", "steady_tok_s"):
                per = [r[key] / bare[r["round"]][key] for r in mine if r["round"] in bare]
                line[f"{key}_ratio_per_round"] = per
                if per:
                    line[f"{key}_ratio_median"] = statistics.median(per)
        out[name] = line
    return out


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    out = [
        f"# Teacher saturation ({result['date']}, commit `{result['commit']}`)",
        "",
        f"Real vLLM CPU server ({cfg['model_path']}), {cfg['prompts']} completions prompts, "
        f"{cfg['max_tokens']} tokens, top-{cfg['k']}, {cfg['in_flight']} in flight, seed "
        f"{cfg['seed']}, {cfg['rounds']} rounds. Command: `{result['command']}`.",
        "",
        "| round | contender | tokens | e2e tok/s | active tok/s | steady tok/s | running "
        "(steady) | first token s | CPU-s (tree) | server CPU-s | other load (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        if not r["ok"]:
            out.append(f"| {r['round']} | {r['contender']} | failed | | | | | | | | |")
            continue
        out.append(
            f"| {r['round']} | {r['contender']} | {r['tokens']:,} | {r['e2e_tok_s']:,.0f} | "
            f"{r['active_tok_s']:,.0f} | {r['steady_tok_s']:,.0f} | "
            f"{r['running_mean_steady']:.1f} | {r['first_token_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['server_cpu_s']:.1f} | {r['other_cores']:.2f} |"
        )
    out += [
        "",
        "Cores used during the steady span (10% to 90% of the tokens), by process kind:",
        "",
        "| round | contender | vLLM server | contender, all | by kind |",
        "|---|---|---:|---:|---|",
    ]
    for r in result["runs"]:
        kinds = r.get("cores_steady_by_kind")
        if not r["ok"] or not kinds:
            continue
        out.append(
            f"| {r['round']} | {r['contender']} | {r.get('server_cores_steady', 0):.2f} | "
            f"{sum(kinds.values()):.3f} | "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(kinds.items()))
            + " |"
        )
    out += [
        "",
        "| contender | e2e ratio (per round) | active ratio | steady ratio |",
        "|---|---|---|---|",
    ]
    for name, line in result["summary"].items():
        if name == "bare":
            continue
        cells = []
        for key in ("e2e_tok_s", "active_tok_s", "steady_tok_s"):
            per = ", ".join(f"{v:.3f}" for v in line.get(f"{key}_ratio_per_round", []))
            med = line.get(f"{key}_ratio_median")
            cells.append(f"**{med:.3f}** ({per})" if med is not None else "-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def start_server(args: argparse.Namespace) -> tuple[Any, str]:
    from workers.replica.vllm_server import VllmServer

    server = VllmServer(
        model=str(args.model_path),
        served_name=args.model,
        workdir=ROOT / ".cache" / "saturation",
        cache_dir=ROOT / ".cache" / "test-vllm" / "cache",  # the tests' warm compile caches
        extra_args=TINY_ARGS if args.model_path == TINY else ["--dtype", "bfloat16"],
    )
    return server, server.start(timeout_s=300)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", help="a vLLM server already running (its /v1 URL); else start one")
    ap.add_argument("--model", default="tiny", help="served model name")
    ap.add_argument("--model-path", type=Path, default=TINY)
    ap.add_argument("--prompts", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--wait-idle", type=float, default=0.0,
        help="wait up to this many s before each run for other load to drop under 0.3 cores",
    )  # fmt: skip
    ap.add_argument("--contenders", nargs="+", default=["harvest", "bare"])
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "saturation.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in args.contenders:
        contender_args(name)  # fail on a typo before the server starts
    server, url = (None, args.url) if args.url else start_server(args)
    runs: list[dict[str, Any]] = []
    try:
        warm = {"model": args.model, "prompt": "warm up", "max_tokens": 2, "logprobs": args.k}
        httpx.post(url + "/completions", json=warm, timeout=300).raise_for_status()
        with tempfile.TemporaryDirectory(prefix="saturation-") as tmp:
            write_prompts(Path(tmp) / "prompts.jsonl", args.prompts)
            for rnd in range(args.rounds):
                order = args.contenders if rnd % 2 == 0 else args.contenders[::-1]
                for name in order:
                    r = run_one(name, rnd, args, url, Path(tmp))
                    runs.append(r)
                    print(
                        f"round {rnd} {name}: ok={r['ok']} tokens {r['tokens']} e2e "
                        f"{r['e2e_tok_s']:.0f} steady {r.get('steady_tok_s', 0):.0f} tok/s "
                        f"running {r.get('running_mean_steady', 0):.1f} cpu {r['cpu_s']:.1f}s "
                        f"server cpu {r['server_cpu_s']:.1f}s",
                        flush=True,
                    )
    finally:
        if server is not None:
            server.stop()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/saturation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit(),
        "machine": machine(),
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"
        },
        "token_totals": {r["contender"] + f"/r{r['round']}": r["tokens"] for r in runs},
        "summary": summarise(runs),
        "runs": runs,
    }
    save(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
