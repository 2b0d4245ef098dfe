"""Peak memory of a harvest by process kind, and how it grows with the input (issue #11).

Runs the real scheduler (``run_job``, bench/peer_clients.py's harvest contender, its own local
Ray cluster in a child process) against the memoised synthetic teacher of bench/peers.py and
samples the child's process tree (bench/treeprobe.py): peak RSS of the driver, the harvest
workers, Ray's workers and Ray's own processes. Two studies, default job settings otherwise
(2,000 rows per shard, 2 workers, 64 in flight):

- growth: small answers (``--max-tokens`` 2, top-``--k`` 5) at ``--sizes`` (10k and 1M
  prompts); growth = (peak at the large size - peak at the small) / peak at the small;
- big answers: 256 tokens, top-20 at ``--big-prompts`` (8,000: four units, both workers busy).

    .venv/bin/python bench/memory.py     # the 1M run alone took ~90 min on 2 loaded cores
    .venv/bin/python bench/memory.py --sizes 1000 20000 --big-prompts 0   # smoke run

Writes ``bench/results/memory.json`` and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from peers import run_one  # noqa: E402
from report import commit, machine, save  # noqa: E402
from synthetic import ProcessTeacher  # noqa: E402

KINDS = ("driver", "harvest_workers", "ray_workers", "ray_system")


def one(prompts: int, max_tokens: int, k: int, args: argparse.Namespace, url: str) -> dict:
    conf = argparse.Namespace(
        max_tokens=max_tokens, k=k, in_flight=args.in_flight, workers=args.workers,
        batch_size=0, ray_concurrency=0, cap_s=args.cap_s,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="memory-", dir=args.tmp) as tmp:
        r = run_one("harvest", "completions", prompts, conf, url, Path(tmp))
    r.update(max_tokens=max_tokens, k=k)
    r.pop("cpu_by_kind", None)
    print(
        f"{prompts:>9,} prompts x {max_tokens} tokens top-{k}: finished={r['finished']} "
        f"wall {r['wall_s']:.0f}s peak {r['peak_rss_mb_total']:.0f} MB "
        + ", ".join(f"{kd} {r['peak_rss_mb_by_kind'].get(kd, 0):.0f}" for kd in KINDS),
        flush=True,
    )
    if not r["finished"]:
        print(r.get("log_tail", ""), flush=True)
    return r


def growth(small: dict[str, Any], big: dict[str, Any]) -> dict[str, float]:
    out = {"total": big["peak_rss_mb_total"] / small["peak_rss_mb_total"] - 1}
    for kd in KINDS:
        a, b = small["peak_rss_mb_by_kind"].get(kd, 0), big["peak_rss_mb_by_kind"].get(kd, 0)
        if a:
            out[kd] = b / a - 1
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Memory by process kind ({result['date']}, commit {result['commit']})",
        "",
        f"Command: `{result['command']}`. Synthetic teacher (instant, memoised bodies), "
        "default job settings (2,000 rows per shard), 2 workers, 64 in flight.",
        "",
        "| prompts | tokens x top-K | finished | wall s | peak RSS MB (all) | "
        + " | ".join(KINDS)
        + " |",
        "|---:|---|---|---:|---:|" + "---:|" * len(KINDS),
    ]
    for r in result["runs"]:
        kinds = " | ".join(f"{r['peak_rss_mb_by_kind'].get(kd, 0):,.0f}" for kd in KINDS)
        lines.append(
            f"| {r['prompts']:,} | {r['max_tokens']} x {r['k']} | {r['finished']} | "
            f"{r['wall_s']:,.0f} | {r['peak_rss_mb_total']:,.0f} | {kinds} |"
        )
    if "growth" in result:
        g = result["growth"]
        lines += [
            "",
            f"Growth of peak RSS from {result['sizes'][0]:,} to {result['sizes'][1]:,} prompts: "
            + ", ".join(f"{kd} {v:+.1%}" for kd, v in g.items()),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=(10_000, 1_000_000), help="none: skip")
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--big-prompts", type=int, default=8_000, help="0: skip the big answers")
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cap-s", type=float, default=3600.0)
    ap.add_argument("--tmp", default=None, help="where the runs' input and output go")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "memory.json")
    args = ap.parse_args(argv)
    teacher = ProcessTeacher(0.0, 100_000, memoise=True)
    runs = []
    try:
        if args.big_prompts:
            runs.append(one(args.big_prompts, 256, 20, args, teacher.url))
        for size in args.sizes:
            runs.append(one(size, args.max_tokens, args.k, args, teacher.url))
    finally:
        teacher.stop()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "commit": commit(),
        "sizes": list(args.sizes),
        "runs": runs,
    }
    small, big = runs[-2:] if len(args.sizes) == 2 else (None, None)
    if small and big and small["finished"] and big["finished"]:
        result["growth"] = growth(small, big)
    save(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
