"""Does harvest throughput scale with the number of teacher endpoints?

Why: the point of listing several vLLM endpoints in a job is that a harvest with E endpoints
runs E times as fast as with one. Real teachers are too noisy (and too expensive on a laptop)
to show that, so this benchmark uses synthetic teachers with a *fixed* per-request service time
(``latency_s``) and a *fixed* number of requests served at once (``capacity``): one endpoint can
never do better than ``capacity / latency_s`` requests/s, and E of them never better than E times
that. Any shortfall from that ideal is the harvest pipeline's (client, router, Ray, writer) or
this machine's, not the teacher's.

For E in 1, 2, 4, 8 it starts E teachers (``tests/fault_teacher_server.py``, no faults; by
default each in its own subprocess so they do not share a GIL with each other or the driver),
harvests ``seconds x ideal`` unique prompts through the real pipeline (``run_job`` on one local
Ray cluster shared by all runs) and measures throughput two ways:

* end-to-end: prompts / ``Summary.elapsed_s`` (includes preflight, actor start-up, the last
  shard write and the manifest commit);
* steady state, from the teachers' own logs: completed benchmark requests / (last response
  written - first benchmark request arrived), over all teachers of the run; the preflight probe
  and the GET/404 preflight calls are not benchmark prompts and are excluded.

Scaling is reported as a ratio to linear: ``throughput(E) / (E x throughput(1))``. It also checks
that every prompt was harvested exactly once, with no failures, and that every endpoint served
(``Summary.endpoint_requests``), and reports where the time and the CPU went (start-up split,
teacher queueing, CPU of the harvest actors / teachers / Ray / everything else on the machine).

The client side is sized so that it is not the bottleneck: 2 workers (one per core here),
``in_flight_per_endpoint`` = 2 x capacity (each worker's share alone fills a teacher; together
they keep a queue at every teacher), and small work units (50 rows) at every E, since every row
of the units in flight waits in the worker's router. See bench/README.md for why and for results.

Run: ``.venv/bin/python bench/bench_endpoints.py [--quick]`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from localray import start_local_ray
from report import RunResult, diagnostics, table
from synthetic import (
    MODEL,
    ROOT,
    TESTS,
    LoadProbe,
    ProcessTeacher,
    Teacher,
    ThreadTeacher,
    wait_idle,
)

TIMELINE_BIN_S = 0.5


def _write_prompts(path: Path, endpoints: int, count: int) -> list[str]:
    texts = [f"bench E={endpoints} prompt {i}: tell me about number {i}" for i in range(count)]
    with open(path, "w") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": f"e{endpoints}-{i}", "prompt": text}) + "\n")
    return texts


def _job(
    args: argparse.Namespace, urls: list[str], prompts_file: Path, out: Path, unit_rows: int
) -> Any:
    from schemas.job import parse_job

    return parse_job(
        {
            "input": str(prompts_file),
            "teacher": {
                "model": MODEL,
                "endpoints": urls,
                "authorization": {
                    "owner": "bench",
                    "license": "test",
                    "attestation": "synthetic teacher (tests/fault_teacher_server.py)",
                },
                "timeout_s": 30.0,
            },
            "sampling": {"max_tokens": args.max_tokens, "n": 1, "logprobs": args.logprobs},
            "output": {"dir": str(out), "rows_per_shard": unit_rows},
            "concurrency": {
                "workers": args.workers,
                "in_flight_per_endpoint": args.in_flight,
                "worker_cpus": args.worker_cpus,
            },
        },
        "bench job",
    )


def _start_teachers(args: argparse.Namespace, count: int) -> list[Teacher]:
    kind = ProcessTeacher if args.servers == "process" else ThreadTeacher
    teachers: list[Teacher] = []
    try:
        for _ in range(count):
            teachers.append(kind(args.latency, args.capacity))
    except BaseException:
        for t in teachers:
            t.stop()
        raise
    return teachers


def run_config(args: argparse.Namespace, endpoints: int, workdir: Path) -> RunResult:
    """Harvest ``seconds x ideal`` prompts through ``endpoints`` synthetic teachers."""
    from harvest.driver.options import RunOptions
    from harvest.driver.scheduler import run_job
    from harvest.training import reader

    ideal = endpoints * args.capacity / args.latency
    count = round(args.seconds * ideal)
    unit_rows = args.unit_rows
    folder = workdir / f"e{endpoints}"
    folder.mkdir(parents=True)  # workdir is per repeat
    texts = _write_prompts(folder / "prompts.jsonl", endpoints, count)
    problems: list[str] = []

    teachers = _start_teachers(args, endpoints)
    idle = (0.0, 0.0)
    try:
        if args.wait_idle > 0:
            idle = wait_idle(args.wait_idle, args.idle_below)
        urls = [t.url for t in teachers]
        spec = _job(args, urls, folder / "prompts.jsonl", folder / "out", unit_rows)
        pids = {t.pid for t in teachers if t.pid is not None}
        with LoadProbe(pids) as load:
            t_call = time.monotonic()  # CLOCK_MONOTONIC: the teachers' clock too, on Linux
            summary = run_job(spec, folder / "out", options=RunOptions(show_progress=False))
            t_return = time.monotonic()
        logs = [t.records() for t in teachers]
    finally:
        for t in teachers:
            t.stop()

    # Exactly once: every prompt id in the data, once; nothing failed.
    ids = reader.read_table(folder / "out")["prompt_id"].to_pylist()
    expected = {f"e{endpoints}-{i}" for i in range(count)}
    dupes = [k for k, v in Counter(ids).items() if v > 1]
    if set(ids) != expected or dupes or len(ids) != count:
        problems.append(
            f"harvested {len(ids)} rows for {count} prompts "
            f"({len(expected - set(ids))} missing, {len(dupes)} duplicated)"
        )
    if summary.data_rows != count or summary.failure_rows:
        problems.append(f"summary: {summary.data_rows} data, {summary.failure_rows} failed rows")

    # Every endpoint served (the summary's own per-endpoint counts).
    per_endpoint = [summary.endpoint_requests.get(u, 0) for u in spec.teacher.endpoints]
    if min(per_endpoint) == 0:
        problems.append(f"an endpoint served nothing: {per_endpoint}")
    if sum(per_endpoint) != count:
        problems.append(f"endpoint counts sum to {sum(per_endpoint)}, not {count}")

    # Steady state from the teachers' logs, benchmark prompts only.
    wanted = set(texts)
    recs = [
        [r for r in log if r["key"] in wanted and r["path"].endswith("completions")] for log in logs
    ]
    flat = [r for rs in recs for r in rs]
    done = [r for r in flat if r["outcome"] == "ok" and r["t_done"] is not None]
    served_keys = Counter(r["key"] for r in done)
    if set(served_keys) != wanted:
        problems.append(f"teachers answered {len(served_keys)} of {count} prompts")
    start = min(r["t"] for r in flat)
    # Start-up, from the teachers' clocks: run_job -> first preflight call (input scan,
    # manifest) -> generation probe from a fresh harvest worker (preflight checks of every
    # endpoint, Ray actor start-up) -> first benchmark request (first units dispatched).
    every = [r for log in logs for r in log]
    first_call = min(r["t"] for r in every)
    probes = [r["t"] for r in every if r["path"].endswith("completions") and r["key"] not in wanted]
    probe = min(probes, default=start)
    checks = [r["t_done"] or r["t"] for r in every if r["t"] < probe]  # /models, /tokenize
    checked = max(checks, default=first_call)
    split = {
        "scan": first_call - t_call,
        "preflight": checked - first_call,
        "workers": probe - checked,
        "first_units": start - probe,
    }
    end = max(r["t_done"] for r in done)
    window = end - start
    timeline = [0] * (int(window / TIMELINE_BIN_S) + 1)
    for r in done:
        timeline[int((r["t_done"] - start) / TIMELINE_BIN_S)] += 1
    busy = [sum(r["t_done"] - r["t_served"] for r in rs if r["t_served"]) for rs in recs]
    utilization = statistics.fmean(b / (args.capacity * window) for b in busy)
    return RunResult(
        endpoints=endpoints,
        prompts=count,
        unit_rows=unit_rows,
        ideal_rps=ideal,
        elapsed_s=summary.elapsed_s,
        e2e_rps=count / summary.elapsed_s,
        steady_window_s=window,
        steady_rps=len(done) / window,
        utilization=utilization,
        mean_queue_wait_ms=1000 * statistics.fmean(r["t_served"] - r["t"] for r in done),
        mean_service_ms=1000 * statistics.fmean(r["t_done"] - r["t_served"] for r in done),
        per_endpoint=per_endpoint,
        retries=summary.retries,
        startup_s=start - t_call,
        startup_split={k: round(v, 3) for k, v in split.items()},
        tail_s=t_return - end,
        machine_busy=load.machine_busy,
        cpu_s={k: round(v, 2) for k, v in load.cpu_s.items()},
        load_1m=(load.load_start, load.load_end),
        timeline=timeline,
        idle_wait=idle,
        ok=not problems,
        problems=problems,
    )


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~3 s per run instead of ~15 s")
    p.add_argument("--endpoints", default="1,2,4,8", help="endpoint counts (default 1,2,4,8)")
    p.add_argument("--latency", type=float, default=0.2, help="teacher service time, s")
    p.add_argument("--capacity", type=int, default=4, help="requests a teacher serves at once")
    p.add_argument("--seconds", type=float, default=15.0, help="run length at the ideal rate")
    p.add_argument("--workers", type=int, default=2, help="harvest actors")
    p.add_argument(
        "--in-flight",
        type=int,
        default=None,
        help="in_flight_per_endpoint (job-wide; default 2 x capacity, so every endpoint has a "
        "queue to pull from even while a worker writes a shard)",
    )
    p.add_argument("--worker-cpus", type=float, default=0.5)
    p.add_argument(
        "--unit-rows",
        type=int,
        default=50,
        help="rows_per_shard (= work unit size), the same at every E as in a real job; small, "
        "because every row of the units in flight waits in the worker's router (see README)",
    )
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--logprobs", type=int, default=5)
    p.add_argument(
        "--servers",
        choices=("process", "thread"),
        default="process",
        help="run each teacher in its own subprocess (default) or as a thread of this process",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="sweeps (interleaved); tables show medians"
    )
    p.add_argument(
        "--worker-niceness",
        type=int,
        default=None,
        help="nice value of this cluster's Ray workers (RAY_worker_niceness; Ray's default 15 "
        "lets any normal-priority load on a shared machine starve the harvest actors)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run wait up to S seconds for the machine to be quiet (shared boxes)",
    )
    p.add_argument(
        "--idle-below",
        type=float,
        default=0.3,
        help="'quiet' = machine CPU busy under this fraction for 3 s (default 0.3)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the raw results here (JSON)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = 3.0
    if args.in_flight is None:
        args.in_flight = 2 * args.capacity
    return args


def _git_state() -> dict[str, Any]:
    """The commit measured, and whether the pipeline's files differed from it."""

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    changed = [line for line in git("status", "--porcelain").splitlines() if "bench/" not in line]
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": changed}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Keep Ray on loopback; import it (and the pipeline) only now.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # noqa: SIM112
    sys.path[:0] = [str(ROOT), str(TESTS)]
    import ray

    counts = [int(x) for x in args.endpoints.split(",")]
    start_local_ray()
    by_e: dict[int, list[RunResult]] = {e: [] for e in counts}
    started, git_state = datetime.now(UTC), _git_state()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-endpoints-") as tmp:
            for rep, e in ((rep, e) for rep in range(args.repeats) for e in counts):
                r = run_config(args, e, Path(tmp) / f"r{rep}")
                by_e[e].append(r)
                print(
                    f"E={e} (run {rep + 1}): {r.prompts} prompts in {r.elapsed_s:.1f} s, "
                    f"e2e {r.e2e_rps:.1f} req/s, steady {r.steady_rps:.1f} req/s "
                    f"(ideal {r.ideal_rps:.0f}), util {r.utilization:.1%}, "
                    f"machine busy {r.machine_busy:.0%}"
                    + (
                        f" (waited {r.idle_wait[0]:.0f} s for {r.idle_wait[1]:.0%})"
                        if args.wait_idle > 0
                        else ""
                    )
                    + ", "
                    f"actors {r.cpu_s.get('harvest_actors', 0) / r.elapsed_s:.2f} cores"
                    + ("" if r.ok else f"  PROBLEMS: {r.problems}"),
                    flush=True,
                )
    finally:
        ray.shutdown()

    print()
    print(table(by_e))
    print()
    print(diagnostics(by_e))
    if args.out:
        config = {k: v for k, v in vars(args).items() if k not in ("out", "serve")}
        args.out.write_text(
            json.dumps(
                {
                    "started": started.isoformat(timespec="seconds"),
                    "command": " ".join(
                        [".venv/bin/python", "bench/bench_endpoints.py", *sys.argv[1:]]
                    ),
                    "machine": {
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "platform": platform.platform(),
                    },
                    "git": git_state,
                    "config": config,
                    "runs": [asdict(r) for runs in by_e.values() for r in runs],
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(r.ok for runs in by_e.values() for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
