"""A real-socket, fault-injecting OpenAI-compatible teacher for tests of retries under failure.

``FakeTeacher`` (httpx.MockTransport) never exercises TCP: no resets, no timeouts, no truncated
bodies on the wire. This server listens on 127.0.0.1 in a background thread with its own asyncio
loop and a minimal HTTP/1.1 implementation, so every fault is exact at the byte level: a *reset*
is an RST with no response bytes, a *truncated* answer is a valid 200 whose Content-Length
matches a cut JSON body. Success bodies come from ``FakeTeacher.answer`` (vLLM 0.32 shapes).

``/v1/chat/completions`` renders the messages with the fake's chat template and answers what
``/v1/completions`` answers for those ids, in vLLM's chat shape (``FakeTeacher.chat_answer``).

Faults are deterministic and always recoverable: each generation request (``/v1/completions``
or ``/v1/chat/completions``) is keyed by its prompt (or the last user message for chat; a
token-id prompt is decoded with the fake teacher's invertible toy tokenizer) and the server's
own attempt count for that key (per path); one seeded hash per
(key, attempt) picks at most one fault, and only the first ``faulty_attempts`` (2) attempts of a
key can be faulted, so a client with >= 4 attempts completes every prompt (except the
``always_*`` ones). ``/tokenize`` is counted apart and never faulted, except
by a storm (every request 429 for a while) or ``go_down`` (connections refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import socket
import struct
import threading
import time
from collections import defaultdict
from dataclasses import replace
from http import HTTPStatus
from typing import Any

import orjson
import psutil
from fake_teacher import FakeTeacher
from fault_plan import FAULTS, FaultPlan, Record, prompt_key

__all__ = ["FAULTS", "FaultPlan", "FaultTeacherServer", "Record", "prompt_key"]

_ERROR_TYPES = {"400": "BadRequestError", "404": "NotFoundError", "429": "TooManyRequestsError"}
_ERROR_TYPES |= {"500": "InternalServerError", "503": "ServiceUnavailableError"}


class FaultTeacherServer:
    """Context manager: ``with FaultTeacherServer(plan=...) as s: s.url`` -> ".../v1"."""

    def __init__(self, model: str = "fault", plan: FaultPlan | None = None) -> None:
        self.model = model
        self.plan = plan or FaultPlan()
        self.fake = FakeTeacher(model=model)
        self.port = 0
        self._lock = threading.Lock()
        self._log: list[Record] = []
        self._attempts: defaultdict[tuple[str, str], int] = defaultdict(int)  # (path, key)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._storm_until: float | None = None  # set by the first request a storm plan sees
        self._sem: asyncio.Semaphore | None = None
        self._sem_size: int | None = None
        self._busy = 0
        self._completions = 0  # generation requests seen (for ``down_after``)
        self._draining = False  # down_after struck: answer what is in service, nothing new
        self.down_at: float | None = None  # monotonic, when ``down_after`` took it down

    # ---- control, from the test's thread ----
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def set_plan(self, plan: FaultPlan) -> None:
        self.plan = plan  # read once per request by the loop thread
        self._storm_until = None  # a new plan's storm starts with its first request

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

    def go_down(self) -> None:
        """Close the listening socket (new connections are refused) and reset every open one."""
        self._call(self._go_down(reset=True))

    def come_back(self) -> None:
        """Listen again on the same port; the log and attempt counts carry on."""
        self._draining = False
        self._call(self._listen(self.port))

    async def _die(self, graceful: bool) -> None:
        """``down_after``'s kill, from the loop thread."""
        if not graceful:
            await self._go_down(reset=True)
            return
        server, self._server = self._server, None
        if server is not None:
            server.close()  # refuse new connections; the handlers in service go on

    def _call(self, coro: Any) -> None:
        assert self._loop is not None, "server not started"
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # ---- the loop thread ----
    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        await self._listen(0)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._go_down()

    async def _listen(self, port: int) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._connection, "127.0.0.1", port, backlog=1024, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]

    async def _go_down(self, reset: bool = False) -> None:
        """Stop listening and end every connection: with RST if ``reset``, else with FIN."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers) if reset else ():
            _linger_zero(writer)  # the handler's abort() then sends RST
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
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
            self._writers.discard(writer)
            writer.transport.abort()

    async def _respond(
        self, w: asyncio.StreamWriter, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> bool:
        """Log and answer one request; False when the connection must not be reused."""
        plan = self.plan
        body: Any = {}
        with contextlib.suppress(orjson.JSONDecodeError):
            body = orjson.loads(raw) if raw else {}
        body = body if isinstance(body, dict) else {}
        key = prompt_key(body) if method == "POST" else None
        if key is not None:
            self._attempts[path, key] += 1
        attempt = self._attempts[path, key] if key is not None else 0
        now, msg = time.monotonic(), ""
        dying = False
        if path in _GENERATE and method == "POST":
            self._completions += 1
            dying = plan.down_after > 0 and self._completions == plan.down_after
        if dying:  # from this request on nothing is answered, before the sockets even close
            self.down_at, self._draining = now, True
            asyncio.get_running_loop().create_task(self._die(plan.down_graceful))
        if plan.storm_s > 0 and method == "POST" and path in _POST_PATHS:
            if self._storm_until is None:
                self._storm_until = now + plan.storm_s
            storm = now < self._storm_until
        else:
            storm = False
        if dying or self._draining:
            outcome = "down"
        elif storm:
            outcome, msg = "429", "injected 429 (storm)"
        elif method == "GET" and path in ("/health", "/v1/models"):
            outcome = "ok"
        elif method != "POST" or path not in _POST_PATHS:
            outcome, msg = "404", f"Not Found: {method} {path}"
        elif body.get("model") != self.model:
            outcome, msg = "404", f"The model `{body.get('model')}` does not exist."
        elif path == "/tokenize":
            outcome = "ok" if key is not None else "400"
            msg = "prompt or messages is required"
            if plan.no_chat_template and "messages" in body:
                outcome, msg = "400", NO_TEMPLATE
        elif (
            key is None
            or "max_tokens" not in body
            or not {"logprobs", "prompt_logprobs"} & set(body)
        ):
            outcome, msg = "400", "prompt, max_tokens and logprobs are required here"
        elif plan.max_logprobs is not None and _k(body) > plan.max_logprobs:
            outcome = "400"  # vLLM 0.32's words and its structured param
            msg = (
                f"Requested sample logprobs of {_k(body)}, which is greater than max allowed: "
                f"{plan.max_logprobs}"
            )
        else:
            outcome = plan.decide(key, attempt)
            always = key in plan.always_400 or key in plan.always_503
            msg = f"injected {outcome}" + (f" (always_{outcome} prompt)" if always else "")
        retry_after = None
        if outcome == "429":
            retry_after = _retry_after(plan) or ("0" if storm else None)
        rec = Record(
            now, time.time(), path, key, attempt, outcome, retry_after,
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
        if rec.outcome == "down":  # gone: this request is never answered
            w.transport.abort()
            return False
        if rec.outcome == "reset":
            _linger_zero(w)
            w.transport.abort()  # linger 0: the kernel sends RST, no response bytes at all
            return False
        if rec.outcome in _ERROR_TYPES:
            status = int(rec.outcome)
            err = {"error": {"message": msg, "type": _ERROR_TYPES[rec.outcome], "code": status}}
            if msg.startswith("Requested sample logprobs"):
                err["error"]["param"] = "logprobs"
            extra = {"Retry-After": rec.retry_after} if rec.retry_after else {}
            await _write(w, status, orjson.dumps(err), extra)
            return True
        if rec.outcome == "stall":
            await asyncio.sleep(plan.stall_s)
        if rec.outcome == "endless":
            await self._endless(w, rec)
            return False
        if path == "/health":
            await _write(w, 200, b"")
            return True
        if path == "/v1/models":
            models = {"object": "list", "data": [{"id": self.model, "root": "/fault"}]}
            await _write(w, 200, orjson.dumps(models))
            return True
        if path == "/tokenize":  # cheap on a real server too: no capacity slot, no latency
            with self._lock:
                rec.t_served, rec.busy = rec.t, 0
            await _write(w, 200, orjson.dumps(self.fake.tokenize(body)))
            return True
        async with self._capacity(plan):
            self._busy += 1
            with self._lock:
                rec.t_served, rec.busy = time.monotonic(), self._busy
            try:
                if plan.latency_s:
                    await asyncio.sleep(plan.latency_s)
                chat = path == "/v1/chat/completions"
                answer = self.fake.chat_answer(body) if chat else self.fake.answer(body)
            finally:
                self._busy -= 1
        if rec.outcome == "malformed" and chat:  # copies: a memoised answer is shared
            lp = answer["choices"][0]["logprobs"]
            content = list(lp["content"])
            content[len(content) // 2] = {**content[len(content) // 2], "logprob": None}
            choice = {**answer["choices"][0], "logprobs": {**lp, "content": content}}
            answer = {**answer, "choices": [choice, *answer["choices"][1:]]}
        elif rec.outcome == "malformed":  # one null logprob, mid-answer: the wrong shape
            lps = answer["choices"][0]["logprobs"]["token_logprobs"]
            lps[len(lps) // 2] = None
        data = orjson.dumps(answer)
        if rec.outcome == "truncated":
            data = data[: len(data) // 2]
        await _write(w, 200, data)
        return not self._draining  # a server shutting down closes each connection it answered

    async def _endless(self, w: asyncio.StreamWriter, rec: Record) -> None:
        """A 200 whose chunked body goes on (a JSON string that never closes) until the client
        hangs up; ``rec.sent`` counts the bytes the socket took, ``rec.rss`` the memory of the
        process reading it (found by its socket) at the start and at most, sampled per MiB."""
        reader = _peer_process(w)
        head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        w.write((head + "transfer-encoding: chunked\r\n\r\n").encode("latin-1"))
        chunk = b'{"id":"cmpl-endless","choices":[{"index":0,"text":"' + b"a" * (1 << 16)
        try:
            while True:
                w.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                await w.drain()
                with self._lock:
                    rec.sent += len(chunk)
                    if reader is not None and rec.sent % (1 << 20) < len(chunk):
                        rss = _rss(reader)
                        start, peak = rec.rss or (rss, rss)
                        rec.rss = (start, max(peak, rss))
                chunk = b"a" * (1 << 16)
        except ConnectionError:
            return  # the client stopped reading and closed the connection

    def _capacity(self, plan: FaultPlan) -> contextlib.AbstractAsyncContextManager[Any]:
        if plan.capacity is None:
            return contextlib.nullcontext()
        if self._sem is None or self._sem_size != plan.capacity:
            self._sem, self._sem_size = asyncio.Semaphore(plan.capacity), plan.capacity
        return self._sem


_GENERATE = ("/v1/completions", "/v1/chat/completions")
_POST_PATHS = (*_GENERATE, "/tokenize")
NO_TEMPLATE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must provide "
    "a chat template if the tokenizer does not define one."
)


def _k(body: dict[str, Any]) -> int:
    """The K a generation request asks for (completions' logprobs, chat's top_logprobs)."""
    k = body.get("top_logprobs") if "messages" in body else body.get("logprobs")
    return k if type(k) is int else 0


def _linger_zero(writer: asyncio.StreamWriter) -> None:
    """Make closing this connection send RST (no FIN, no pending bytes)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _peer_process(w: asyncio.StreamWriter) -> psutil.Process | None:
    """The local process on the other end of this connection (a test's client, a Ray worker)."""
    peer = w.get_extra_info("peername")
    for conn in psutil.net_connections(kind="tcp4"):
        if conn.laddr and tuple(conn.laddr) == tuple(peer[:2]) and conn.pid:
            return psutil.Process(conn.pid)
    return None


def _rss(process: psutil.Process) -> int:
    with contextlib.suppress(psutil.Error):
        return process.memory_info().rss
    return 0


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
