"""Why an always-400 prompt can reach the teacher twice: a stalled event loop, not aiohttp.

The client bounds each request with ``asyncio.timeout(teacher.timeout_s)``. If the worker's
event loop is stalled (CPU starved: Ray workers run at nice 15 on a loaded 2-core machine)
for longer than that while a request is out, then when the loop runs again the timeout fires
before the task that holds the already-received 400 resumes: the row gets ``TeacherTimeout``
(retryable), and the retry sends it again. The server saw, and logged, both requests.

aiohttp itself does not re-send: 3.14's client retries a reused keep-alive connection only
for ``IDEMPOTENT_METHODS`` (GET, HEAD, OPTIONS, TRACE, PUT, DELETE), never POST.

    .venv/bin/python bench/double_send.py      # ~2 min; prints how often each transport re-sent
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fault_teacher_server import FaultPlan, FaultTeacherServer  # noqa: E402

from schemas.job import parse_job  # noqa: E402
from schemas.wire import PromptRow  # noqa: E402
from workers.errors import HarvestError  # noqa: E402
from workers.teacher.client import TeacherClient  # noqa: E402

TRIES = 40
STALL_S = 1.3  # longer than timeout_s (1.0, as in tests/integration/test_fault_matrix.py)


async def one(server: FaultTeacherServer, transport: str, delay: float, key: str) -> list[str]:
    """Send ``key`` (always answered 400) while the loop stalls ``delay`` s after sending."""
    teacher = {
        "model": "fault",
        "endpoints": [server.url],
        "authorization": {"owner": "bench", "license": "test", "attestation": "fault server"},
        "timeout_s": 1.0,
        "max_attempts": 6,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "transport": transport,
    }
    spec = parse_job({"input": "unused.jsonl", "teacher": teacher}, "double-send bench")
    client = TeacherClient(spec, job_id="double-send")
    try:
        await client.complete(PromptRow("warm", "bench", prompt="warm"))  # a kept-alive conn
        task = asyncio.create_task(client.complete(PromptRow(key, "bench", prompt=key)))
        asyncio.get_running_loop().call_later(delay, time.sleep, STALL_S)  # the stall
        try:
            await task
        except HarvestError:
            pass
    finally:
        await client.aclose()
    return [r.outcome for r in server.log if r.key == key]


async def main() -> None:
    bad = {f"bad-{t}-{i}" for t in ("httpx", "aiohttp") for i in range(TRIES)}
    with FaultTeacherServer(plan=FaultPlan(always_400=bad)) as server:
        for transport in ("httpx", "aiohttp"):
            sent = [
                await one(server, transport, i * 0.0005, f"bad-{transport}-{i}")
                for i in range(TRIES)
            ]
            twice = sum(len(s) > 1 for s in sent)
            print(f"{transport}: the 400 prompt reached the server more than once in "
                  f"{twice} of {TRIES} stalls of {STALL_S} s")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
