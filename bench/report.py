"""The benchmark's per-run record and its markdown tables (bench/README.md is built from them)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def commit() -> str:
    """The short commit the benchmark ran at."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH
    ).stdout.strip()


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version()}


def save(out: Path, result: dict[str, Any], text: str) -> None:
    """Write a study's ``result`` as ``out`` (JSON) and its markdown beside it; print the latter."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(text)
    print(text)


@dataclass
class RunResult:
    endpoints: int
    prompts: int
    unit_rows: int
    ideal_rps: float
    elapsed_s: float
    e2e_rps: float
    steady_window_s: float
    steady_rps: float
    utilization: float  # mean over endpoints: busy slot-seconds / (capacity x window)
    mean_queue_wait_ms: float  # arrival -> service start, at the teachers
    mean_service_ms: float  # service start -> response written, at the teachers
    per_endpoint: list[int]  # from Summary.endpoint_requests, in endpoint order
    retries: int
    startup_s: float  # run_job called -> first benchmark request at a teacher, split into:
    startup_split: dict[str, float]  # scan, preflight, workers, first_units (see run_config)
    tail_s: float  # last response written -> run_job returned
    machine_busy: float  # whole-machine CPU busy fraction during the run (all processes)
    cpu_s: dict[str, float]  # CPU seconds during run_job: ours by role, and everything else
    load_1m: tuple[float, float]  # 1-minute load average at start and end
    timeline: list[int]  # responses written per TIMELINE_BIN_S since the first arrival
    idle_wait: tuple[float, float]  # (s waited for a quiet machine, busy fraction then)
    ok: bool
    problems: list[str] = field(default_factory=list)


def _median_run(runs: list[RunResult], key: str) -> RunResult:
    """The run whose ``key`` is the median (a real run, so its other columns belong to it)."""
    return sorted(runs, key=lambda r: getattr(r, key))[(len(runs) - 1) // 2]


def table(by_e: dict[int, list[RunResult]]) -> str:
    """The markdown table: one row per endpoint count (the median run when repeated)."""
    e1 = min(by_e)
    base_steady = _median_run(by_e[e1], "steady_rps").steady_rps
    base_e2e = _median_run(by_e[e1], "e2e_rps").e2e_rps
    repeated = any(len(runs) > 1 for runs in by_e.values())
    head = (
        "| endpoints | prompts | elapsed s | e2e req/s | steady req/s "
        + ("| steady range " if repeated else "")
        + "| ideal req/s | steady eff. | steady scaling | e2e scaling | teacher util. "
        "| requests per endpoint | exactly once |\n" + "|---:" * (11 + repeated) + "|:---:|"
    )
    rows = [head]
    for e, runs in by_e.items():
        r = _median_run(runs, "steady_rps")
        r_e2e = _median_run(runs, "e2e_rps")
        e2e = r_e2e.e2e_rps
        scale = e / e1
        spread = f"{min(r.per_endpoint)}-{max(r.per_endpoint)}" if e > 1 else r.per_endpoint[0]
        lo, hi = min(x.steady_rps for x in runs), max(x.steady_rps for x in runs)
        rows.append(
            f"| {e} | {r.prompts} | {r_e2e.elapsed_s:.1f} | {e2e:.1f} | {r.steady_rps:.1f} "
            + (f"| {lo:.1f}-{hi:.1f} " if repeated else "")
            + f"| {r.ideal_rps:.0f} | {r.steady_rps / r.ideal_rps:.1%} "
            f"| {r.steady_rps / (scale * base_steady):.3f} | {e2e / (scale * base_e2e):.3f} "
            f"| {r.utilization:.1%} | {spread} "
            f"| {'yes' if all(x.ok for x in runs) else 'NO'} |"
        )
    return "\n".join(rows)


def diagnostics(by_e: dict[int, list[RunResult]]) -> str:
    """Every run: where the time went, what used the CPU, how loaded the machine was.

    CPU columns are average cores busy over the ``run_job`` call (2 = the whole machine here);
    "other load" is what the machine used beyond this benchmark's own processes.
    """
    lines = [
        "| E | run | e2e req/s | steady req/s | start-up s | of which preflight "
        "| of which workers | tail s | queue wait ms | service ms | retries "
        "| cores: actors | teachers | driver+Ray | other load | load 1m start/end |",
        "|---:" * 15 + "|---|",
    ]
    for e, runs in by_e.items():
        for i, r in enumerate(runs, 1):
            cores = {k: v / r.elapsed_s for k, v in r.cpu_s.items()}
            lines.append(
                f"| {e} | {i} | {r.e2e_rps:.1f} | {r.steady_rps:.1f} | {r.startup_s:.2f} "
                f"| {r.startup_split['preflight']:.2f} | {r.startup_split['workers']:.2f} "
                f"| {r.tail_s:.2f} | {r.mean_queue_wait_ms:.0f} | {r.mean_service_ms:.1f} "
                f"| {r.retries} | {cores.get('harvest_actors', 0):.2f} "
                f"| {cores.get('teachers', 0):.2f} "
                f"| {cores.get('driver', 0) + cores.get('ray_other', 0):.2f} "
                f"| {cores.get('other_processes', 0):.2f} "
                f"| {r.load_1m[0]:.1f} / {r.load_1m[1]:.1f} |"
            )
    return "\n".join(lines)
