"""Synthetic teachers and machine-load probes for the benchmarks in bench/.

A synthetic teacher is ``tests/fault_teacher_server.py`` with no faults, a fixed per-request
service time and a fixed capacity; by default each runs in its own process (its own GIL and
event loop): ``python bench/synthetic.py LATENCY CAPACITY`` prints its port and, on "dump",
its request log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import psutil

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
MODEL = "fault"

# ---------------------------------------------------------------------------------------------
# Synthetic teachers: in a subprocess each (default) or as threads of this process.
# ---------------------------------------------------------------------------------------------


def _record_dicts(log: list[Any]) -> list[dict[str, Any]]:
    """The fields of ``fault_teacher_server.Record`` this benchmark needs, as plain dicts."""
    keep = ("t", "path", "key", "outcome", "t_served", "t_done", "busy")
    return [{k: getattr(r, k) for k in keep} for r in log]


def memoise_answers(server: Any, vocab: int = 32_000, variants: int = 8) -> None:
    """Make ``server`` (a ``FaultTeacherServer``) cheap to run and its answers realistic.

    Generating a 256-token top-20 answer in Python costs the teacher more CPU than parsing it
    costs a client, and this 2-core machine is shared by teacher and client. So the answer body
    for each sampling (and one of ``variants`` slots picked by the prompt) is made once and
    reused, with the request's own ``prompt_token_ids`` and usage spliced in: the client still
    parses a fresh, vLLM-shaped body (``token_id:N`` tokens, K+1 alternatives when the sampled
    token is outside the top K, ``token_ids``/``prompt_token_ids``); ``/v1/chat/completions``
    gets the same answer for its rendered ids, converted to vLLM's chat shape once per sampling
    and slot. ``vocab`` sets the id range (a real vocabulary, so alternatives are not a
    handful of repeated ids).
    """
    from fake_teacher import (
        FakeTeacher,
        batched,
        chat_from_completion,
        completion_body,
        prompt_ids,
    )

    server.fake = fake = FakeTeacher(model=server.model, vocab=vocab)
    make = fake.answer
    cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    scoring: dict[int, list[dict[str, Any]]] = {}  # K -> per-slot top-K entries

    def score(body: dict[str, Any], ids: list[int]) -> dict[str, Any]:
        """A score answer for exactly these ids: each position's actual token first (outside
        the top K, as vLLM adds it), then one of ``variants`` memoised top-K entries whose ids
        (>= 10 x vocab) never collide with a sequence's."""
        k = body["prompt_logprobs"]
        tops = scoring.get(k)
        if tops is None:
            tops = scoring[k] = [
                {
                    str(10 * vocab + 97 * v + j): {
                        "logprob": -0.5 - j * 0.25 - v * 0.01, "rank": j + 1,
                        "decoded_token": f"<{j}>",
                    }
                    for j in range(k)
                }
                for v in range(variants)
            ]  # fmt: skip
        plp: list[Any] = [None]
        for j, actual in enumerate(ids[1:]):
            own = {"logprob": -9.0 - (actual % 7) * 0.125, "rank": k + 3, "decoded_token": "x"}
            plp.append({str(actual): own, **tops[j % variants]})
        choice = {
            "index": 0, "text": "x", "logprobs": None, "finish_reason": "length",
            "stop_reason": None, "token_ids": [5], "prompt_logprobs": plp,
            "prompt_token_ids": ids if body.get("return_token_ids") else None,
        }  # fmt: skip
        usage = {"prompt_tokens": len(ids), "completion_tokens": 1}
        return {
            "object": "text_completion",
            "model": fake.model,
            "choices": [choice],
            "usage": usage,
        }

    def memo_key(body: dict[str, Any], ids: list[int]) -> tuple[Any, ...]:
        """What a memoised completions answer depends on: the sampling and the prompt's slot."""
        key = (body.get("max_tokens"), body.get("logprobs"), body.get("n", 1), body.get("seed"))
        return (*key, bool(body.get("return_token_ids")), sum(ids) % variants)

    def answer(body: dict[str, Any]) -> dict[str, Any]:
        ids = prompt_ids(body)
        if body.get("prompt_logprobs") is not None:
            return score(body, ids)
        key = memo_key(body, ids)
        base = cache.get(key)
        if base is None:
            base = cache[key] = make(body)
        with_ids = bool(body.get("return_token_ids"))
        choices = [{**c, "prompt_token_ids": ids if with_ids else None} for c in base["choices"]]
        usage = {**base["usage"], "prompt_tokens": len(ids)}
        return {**base, "choices": choices, "usage": usage}

    chats: dict[tuple[Any, ...], dict[str, Any]] = {}

    def chat_answer(body: dict[str, Any]) -> dict[str, Any]:
        """``/v1/chat/completions``: the memoised completions answer for the rendered ids, in
        vLLM's chat shape, converted once per sampling and slot; the ids and usage spliced in."""
        req = completion_body(body)
        ids = req["prompt"]
        key = (*memo_key(req, ids), bool(body.get("return_tokens_as_token_ids")))
        base = chats.get(key)
        if base is None:
            base = chats[key] = chat_from_completion(answer(req), body)
        usage = {**base["usage"], "prompt_tokens": len(ids)}
        with_ids = {"prompt_token_ids": ids} if req["return_token_ids"] else {}
        return {**base, "usage": usage, **with_ids}

    fake.answer = lambda body: batched(answer, body)  # type: ignore[method-assign]
    fake.chat_answer = chat_answer  # type: ignore[method-assign]


def serve_forever(latency_s: float, capacity: int, memoise: bool = False) -> None:
    """Subprocess mode: run one teacher; print its port; on "dump" print its log and exit."""
    sys.path.insert(0, str(TESTS))
    from fault_teacher_server import FaultPlan, FaultTeacherServer

    server = FaultTeacherServer(model=MODEL, plan=FaultPlan(latency_s=latency_s, capacity=capacity))
    if memoise:
        memoise_answers(server)
    server.start()
    print(server.port, flush=True)
    for line in sys.stdin:
        if line.strip() == "dump":
            print(json.dumps(_record_dicts(server.log)), flush=True)
            break
    server.stop()


class Teacher(Protocol):
    url: str
    pid: int | None  # its own process, if it has one

    def records(self) -> list[dict[str, Any]]: ...
    def stop(self) -> None: ...


class ProcessTeacher:
    """One synthetic teacher in its own Python process (its own GIL, its own event loop)."""

    def __init__(self, latency_s: float, capacity: int, memoise: bool = False) -> None:
        argv = [sys.executable, __file__, str(latency_s), str(capacity)]
        self.proc = subprocess.Popen(
            [*argv, "memoise"] if memoise else argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        port = self.proc.stdout.readline().strip()
        if not port.isdigit():
            self.proc.kill()
            raise RuntimeError(f"synthetic teacher did not start (said {port!r})")
        self.url = f"http://127.0.0.1:{port}/v1"
        self.pid: int | None = self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("dump\n")
        self.proc.stdin.flush()
        return list(json.loads(self.proc.stdout.readline()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its Popen handle
                self.proc.wait(10)


class ThreadTeacher:
    """One synthetic teacher as a thread of this process (shares the driver's GIL)."""

    def __init__(self, latency_s: float, capacity: int) -> None:
        from fault_teacher_server import FaultPlan, FaultTeacherServer

        plan = FaultPlan(latency_s=latency_s, capacity=capacity)
        self.server = FaultTeacherServer(model=MODEL, plan=plan).start()
        self.url = self.server.url
        self.pid: int | None = None  # a thread of the driver

    def records(self) -> list[dict[str, Any]]:
        return _record_dicts(self.server.log)

    def stop(self) -> None:
        self.server.stop()


# ---------------------------------------------------------------------------------------------
# Machine load, sampled from /proc/stat while a run goes on.
# ---------------------------------------------------------------------------------------------


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_idle(max_wait_s: float, below: float, window_s: float = 3.0) -> tuple[float, float]:
    """Wait (at most ``max_wait_s``) for ``window_s`` with machine CPU busy under ``below``.

    Returns (seconds waited, busy fraction of the last window). On a shared machine this
    starts runs in quiet spells; the load during each run is still measured and reported.
    """
    started = time.monotonic()
    while True:
        b0, t0 = _cpu_times()
        time.sleep(window_s)
        b1, t1 = _cpu_times()
        busy = (b1 - b0) / max(1, t1 - t0)
        waited = time.monotonic() - started
        if busy < below or waited >= max_wait_s:
            return waited, busy


class LoadProbe:
    """CPU use during a block: the whole machine (/proc/stat) and this benchmark's own processes.

    A thread samples the CPU times of every descendant of this process (the Ray cluster this
    script started, its harvest actors, the teacher subprocesses) every ``every_s``; a process
    that exits keeps its last sample. What the machine used beyond that is other load.
    """

    def __init__(self, teacher_pids: set[int], every_s: float = 0.2) -> None:
        self.teacher_pids, self.every_s = teacher_pids, every_s
        self.me = psutil.Process()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-probe", daemon=True)

    def _classify(self, proc: psutil.Process) -> str:
        if proc.pid in self.teacher_pids:
            return "teachers"
        return "harvest_actors" if "HarvestActor" in " ".join(proc.cmdline()) else "ray_other"

    def _sample(self) -> None:
        procs = [(self.me, "driver")]
        for child in self.me.children(recursive=True):
            kind = self.kind.get(child.pid)
            try:  # a Ray worker takes its actor's name only once the actor is created
                procs.append((child, kind if kind == "harvest_actors" else self._classify(child)))
            except psutil.Error:
                continue
        for proc, kind in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            used = t.user + t.system
            self.kind[proc.pid] = kind
            self.first.setdefault(proc.pid, 0.0 if self.started else used)
            self.last[proc.pid] = used

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> LoadProbe:
        self.started = False
        self._sample()  # processes alive now count from now on, later ones from their start
        self.started = True
        self.cpu_start = _cpu_times()
        self.wall_start = time.monotonic()
        self.load_start = os.getloadavg()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        busy, total = _cpu_times()
        self.wall_s = time.monotonic() - self.wall_start
        self.machine_busy = (busy - self.cpu_start[0]) / max(1, total - self.cpu_start[1])
        self.load_end = os.getloadavg()[0]
        self.cpu_s: Counter[str] = Counter()
        for pid, used in self.last.items():
            self.cpu_s[self.kind[pid]] += used - self.first[pid]
        ours = sum(self.cpu_s.values())
        cpus = os.cpu_count() or 1
        self.cpu_s["other_processes"] = max(0.0, self.machine_busy * cpus * self.wall_s - ours)


# ---------------------------------------------------------------------------------------------
# One configuration: E endpoints, one harvest.
# ---------------------------------------------------------------------------------------------


if __name__ == "__main__":
    serve_forever(float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:4] == ["memoise"])
