"""A real-socket, fault-injecting OpenAI-compatible teacher for tests of retries under failure.

``FakeTeacher`` (httpx.MockTransport) never exercises TCP: no resets, no timeouts, no truncated
bodies on the wire. This server listens on 127.0.0.1 in a background thread with its own asyncio
loop and a minimal HTTP/1.1 implementation, so every fault is exact at the byte level: a *reset*
is an RST with no response bytes, a *truncated* answer is a valid 200 whose Content-Length
matches a cut JSON body. Success bodies come from ``FakeTeacher.answer`` (vLLM 0.32 shapes).

Faults are deterministic and always recoverable: each request is keyed by its prompt (or the last
user message for chat) and the server's own attempt count for that key; one seeded hash per
(key, attempt) picks at most one fault, and only the first ``faulty_attempts`` (2) attempts of a
key can be faulted, so a client with >= 4 attempts completes every prompt (except ``always_400``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import math
import socket
import struct
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

import orjson
from fake_teacher import FakeTeacher

FAULTS = ("429", "500", "503", "reset", "stall", "truncated")
_ERROR_TYPES = {"400": "BadRequestError", "404": "NotFoundError", "429": "TooManyRequestsError"}
_ERROR_TYPES |= {"500": "InternalServerError", "503": "ServiceUnavailableError"}


@dataclass(frozen=True)
class FaultPlan:
    """Per-attempt fault probabilities (mutually exclusive, sum <= 1) and service behaviour."""

    rate_429: float = 0.0
    retry_after_s: float = 0.0  # sent with every 429 (delta-seconds, e.g. "1" or "0.05")
    retry_after_http_date: bool = False  # send an IMF-fixdate instead, rounded up to whole s
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_reset: float = 0.0  # RST after reading the request, no response bytes
    rate_stall: float = 0.0
    stall_s: float = 0.0  # sleep this long, then answer (the client should time out first)
    rate_truncated: float = 0.0  # 200, Content-Length of the first half of the real body
    always_400: frozenset[str] | set[str] = frozenset()
    latency_s: float = 0.0  # fixed service time of every real answer
    capacity: int | None = None  # answers served at once; the rest queue
    seed: int = 0
    faulty_attempts: int = 2  # only attempts 1..faulty_attempts of a key may be faulted

    def __post_init__(self) -> None:
        rates = [getattr(self, f"rate_{f}") for f in FAULTS]
        if min(rates) < 0 or sum(rates) > 1.0 + 1e-9:
            raise ValueError(f"fault rates must be >= 0 and sum to <= 1, got {rates}")

    def decide(self, key: str, attempt: int) -> str:
        """The outcome for this key's ``attempt``-th request: "ok", "400" or a fault name."""
        if key in self.always_400:
            return "400"
        if attempt > self.faulty_attempts:
            return "ok"
        digest = hashlib.blake2b(f"{self.seed}\0{attempt}\0{key}".encode(), digest_size=8)
        u = int.from_bytes(digest.digest(), "big") / 2**64
        for fault in FAULTS:
            u -= getattr(self, f"rate_{fault}")
            if u < 0:
                return fault
        return "ok"


@dataclass
class Record:
    """One request as the server saw it (times from ``time.monotonic`` unless ``wall``)."""

    t: float  # arrival (request fully read)
    wall: float
    path: str
    key: str | None  # prompt text / last user message; None for GET and unparseable bodies
    attempt: int  # 1-based per key; 0 when there is no key
    outcome: str  # "ok" | "400" | "404" | a FAULTS name
    retry_after: str | None
    user_agent: str | None
    job_id: str | None
    authorization: str | None
    t_served: float | None = None  # service began (after the capacity queue)
    busy: int = 0  # answers in service when this one began, itself included
    t_done: float | None = None  # response written, connection reset, or handler cancelled


def prompt_key(body: dict[str, Any]) -> str | None:
    """What identifies a request for attempts and ``always_400``."""
    if isinstance(body.get("messages"), list):
        users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1].get("content")) if users else ""
    prompt = body.get("prompt")
    return None if prompt is None else str(prompt)


class FaultTeacherServer:
    """Context manager: ``with FaultTeacherServer(plan=...) as s: s.url`` -> ".../v1"."""

    def __init__(self, model: str = "fault", plan: FaultPlan | None = None) -> None:
        self.model = model
        self.plan = plan or FaultPlan()
        self.fake = FakeTeacher(model=model)
        self.port = 0
        self._lock = threading.Lock()
        self._log: list[Record] = []
        self._attempts: defaultdict[str, int] = defaultdict(int)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem: asyncio.Semaphore | None = None
        self._sem_size: int | None = None
        self._busy = 0

    # ---- control, from the test's thread ----
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def set_plan(self, plan: FaultPlan) -> None:
        self.plan = plan  # read once per request by the loop thread

    @property
    def log(self) -> list[Record]:
        with self._lock:
            return [replace(r) for r in self._log]

    def by_key(self) -> dict[str | None, list[Record]]:
        out: dict[str | None, list[Record]] = defaultdict(list)
        for rec in self.log:
            out[rec.key].append(rec)
        return dict(out)

    def start(self) -> FaultTeacherServer:
        self._thread = threading.Thread(target=self._run, name="fault-teacher", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault teacher did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
            if self._thread.is_alive():
                raise RuntimeError("fault teacher thread did not stop")

    def __enter__(self) -> FaultTeacherServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the loop thread ----
    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:  # HTTP/1.1 keep-alive; bodies by Content-Length only (httpx sends it)
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = head[0].split(" ", 2)
                fields = (line.partition(":") for line in head[1:])
                headers = {k.strip().lower(): v.strip() for k, _, v in fields}
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                keep = await self._respond(writer, method, target.split("?")[0], headers, body)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return  # the client went away (or sent garbage): drop the connection
        except asyncio.CancelledError:
            return  # shutdown; 3.11's start_server callback chokes on a cancelled handler
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _respond(
        self, w: asyncio.StreamWriter, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> bool:
        """Log and answer one request; False when the connection must not be reused."""
        plan, chat = self.plan, path == "/v1/chat/completions"
        body: Any = {}
        with contextlib.suppress(orjson.JSONDecodeError):
            body = orjson.loads(raw) if raw else {}
        body = body if isinstance(body, dict) else {}
        key = prompt_key(body) if method == "POST" else None
        if key is not None:
            self._attempts[key] += 1
        attempt = self._attempts[key] if key is not None else 0
        msg = ""
        if method == "GET" and path in ("/health", "/v1/models"):
            outcome = "ok"
        elif method != "POST" or path not in _POST_PATHS:
            outcome, msg = "404", f"Not Found: {method} {path}"
        elif body.get("model") != self.model:
            outcome, msg = "404", f"The model `{body.get('model')}` does not exist."
        elif key is None or {"max_tokens", "top_logprobs" if chat else "logprobs"} - set(body):
            outcome, msg = "400", "prompt/messages, max_tokens and logprobs are required here"
        else:
            outcome = plan.decide(key, attempt)
            msg = f"injected {outcome}" + (" (always_400 prompt)" if outcome == "400" else "")
        rec = Record(
            time.monotonic(), time.time(), path, key, attempt, outcome,
            _retry_after(plan) if outcome == "429" else None,
            headers.get("user-agent"), headers.get("x-harvest-job-id"),
            headers.get("authorization"),
        )  # fmt: skip
        with self._lock:
            self._log.append(rec)
        try:
            return await self._serve(w, plan, rec, path, body, msg)
        finally:
            with self._lock:
                rec.t_done = time.monotonic()

    async def _serve(
        self, w: asyncio.StreamWriter, plan: FaultPlan, rec: Record, path: str,
        body: dict[str, Any], msg: str,
    ) -> bool:  # fmt: skip
        if rec.outcome == "reset":
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()  # linger 0: the kernel sends RST, no response bytes at all
            return False
        if rec.outcome in _ERROR_TYPES:
            status = int(rec.outcome)
            err = {"error": {"message": msg, "type": _ERROR_TYPES[rec.outcome], "code": status}}
            extra = {"Retry-After": rec.retry_after} if rec.retry_after else {}
            await _write(w, status, orjson.dumps(err), extra)
            return True
        if rec.outcome == "stall":
            await asyncio.sleep(plan.stall_s)
        if path == "/health":
            await _write(w, 200, b"")
            return True
        if path == "/v1/models":
            models = {"object": "list", "data": [{"id": self.model, "root": "/fault"}]}
            await _write(w, 200, orjson.dumps(models))
            return True
        async with self._capacity(plan):
            self._busy += 1
            with self._lock:
                rec.t_served, rec.busy = time.monotonic(), self._busy
            try:
                if plan.latency_s:
                    await asyncio.sleep(plan.latency_s)
                data = orjson.dumps(self.fake.answer(body, path == "/v1/chat/completions"))
            finally:
                self._busy -= 1
        if rec.outcome == "truncated":
            data = data[: len(data) // 2]
        await _write(w, 200, data)
        return True

    def _capacity(self, plan: FaultPlan) -> contextlib.AbstractAsyncContextManager[Any]:
        if plan.capacity is None:
            return contextlib.nullcontext()
        if self._sem is None or self._sem_size != plan.capacity:
            self._sem, self._sem_size = asyncio.Semaphore(plan.capacity), plan.capacity
        return self._sem


_POST_PATHS = ("/v1/completions", "/v1/chat/completions")


def _retry_after(plan: FaultPlan) -> str | None:
    if plan.retry_after_s <= 0 and not plan.retry_after_http_date:
        return None
    if plan.retry_after_http_date:
        return email.utils.formatdate(math.ceil(time.time() + plan.retry_after_s), usegmt=True)
    return f"{plan.retry_after_s:g}"


async def _write(
    w: asyncio.StreamWriter, status: int, data: bytes, extra: dict[str, str] | None = None
) -> None:
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(data)}",
        f"date: {email.utils.formatdate(usegmt=True)}",
        "server: fault-teacher",
        *(f"{k}: {v}" for k, v in (extra or {}).items()),
    ]
    w.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
    await w.drain()
