"""Profile one worker's work: ``harvest_unit`` in this process, against the peers' teacher.

No Ray: what a harvest actor runs per unit (client, parser, writer), under cProfile, on the
memoised synthetic teacher of bench/peers.py in its own process. Prints the top functions by
own time and the worker's tokens per CPU-second of this process.

    .venv/bin/python bench/profile_unit.py --prompts 400 --api chat
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from synthetic import ProcessTeacher  # noqa: E402

from schemas.job import parse_job  # noqa: E402
from schemas.wire import PromptRow, WorkUnit  # noqa: E402
from workers.storage import open_store  # noqa: E402
from workers.teacher.client import TeacherClient  # noqa: E402
from workers.unit import harvest_unit  # noqa: E402


async def run(url: str, args: argparse.Namespace, out: Path) -> int:
    spec = parse_job(
        {
            "input": "x.jsonl",
            "teacher": {
                "model": "fault",
                "endpoints": [url],
                "transport": args.transport,
                "authorization": {"owner": "bench", "license": "test", "attestation": "synthetic"},
            },
            "sampling": {"logprobs": args.k}
            if args.api == "score"
            else {"max_tokens": args.max_tokens, "n": 1, "logprobs": args.k},
            "mode": "score" if args.api == "score" else "generate",
            "concurrency": {
                "in_flight_per_endpoint": args.in_flight,
                "score_rows_per_request": args.rows_per_request,
            },
        }
    )
    rows: list[PromptRow] = []
    for i in range(args.prompts):
        text = f"profile prompt {i}"
        if args.api == "score":  # ids scored as given: 16 prompt ids, max_tokens response ids
            ids = [(i * 7919 + j * 104729) % 32_000 for j in range(16 + args.max_tokens)]
            rows.append(PromptRow(f"p{i}", f"x:{i}", prompt_token_ids=ids[:16], token_ids=ids[16:]))
        elif args.api == "chat":
            rows.append(PromptRow(f"p{i}", f"x:{i}", messages=[{"role": "user", "content": text}]))
        else:
            rows.append(PromptRow(f"p{i}", f"x:{i}", prompt=text))
    client = TeacherClient(spec, job_id="profile")
    try:
        unit = WorkUnit("u", list(rows))
        result = await harvest_unit(unit, client, spec, open_store(str(out)), {})
    finally:
        await client.aclose()
    return result.completion_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--api", choices=["completions", "chat", "score"], default="completions")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--rows-per-request", type=int, default=8, help="score: ids rows per request")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--transport", choices=["httpx", "aiohttp"], default="httpx")
    ap.add_argument("--no-profile", action="store_true", help="time only (cProfile adds cost)")
    ap.add_argument("--callers", nargs="*", default=[], help="also print who calls these")
    args = ap.parse_args()
    teacher = ProcessTeacher(0.0, 100_000, memoise=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prof = cProfile.Profile()
            c0, t0 = time.process_time(), time.monotonic()
            if not args.no_profile:
                prof.enable()
            tokens = asyncio.run(run(teacher.url, args, Path(tmp)))
            prof.disable()
            cpu, wall = time.process_time() - c0, time.monotonic() - t0
    finally:
        teacher.stop()
    print(f"{tokens} tokens, {cpu:.2f} CPU-s, {wall:.2f} s: {tokens / cpu:,.0f} tokens/CPU-s")
    if not args.no_profile:
        stats = pstats.Stats(prof).sort_stats("tottime")
        stats.print_stats(args.top)
        for name in args.callers:
            stats.print_callers(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
