"""Async client for a vLLM teacher's OpenAI-compatible API.

Plain asyncio + httpx, no Ray: unit tests inject an ``httpx.MockTransport``. Each request goes
through the router (which endpoint), the retry policy (how often, how long to wait) and the
error taxonomy (what a failure means). It identifies itself with one stable User-Agent and the
job id, and never hides who is asking.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import orjson

from schemas.job import OVERRIDABLE, JobSpec
from schemas.wire import Answer, Completion, PromptRow
from workers import USER_AGENT
from workers.answers.parse import read_completions
from workers.errors import (
    HarvestError,
    InvalidResponse,
    RateLimited,
    ServerError,
    TeacherTimeout,
    TeacherUnavailable,
    error_for_status,
)
from workers.teacher.retry import build_retrying, parse_retry_after
from workers.teacher.router import PauseListener, Router
from workers.teacher.score import Scored, read_scored, score_body, score_sampling, sequence
from workers.teacher.stats import RequestStats
from workers.teacher.transport import AiohttpTransport, DirectPost, Reply


class RateLimiter(Protocol):
    """Job-wide request/token limits (``workers.teacher.limiter.Limiter`` or its Ray actor)."""

    async def acquire(self, max_tokens: int) -> int: ...
    async def settle(self, handle: int, used_tokens: int) -> None: ...


def sampling_for(spec: JobSpec, row: PromptRow) -> dict[str, Any]:
    """The job's sampling parameters with this row's overrides applied."""
    if spec.mode == "score":
        return score_sampling(spec)
    params = spec.sampling.model_dump(include=set(OVERRIDABLE))
    params.update(row.overrides)
    if spec.mode == "round" and spec.student is not None:  # which student, and the teacher's K
        params.update(mode="round", student=spec.student.model, k=spec.sampling.logprobs)
    return params


Ready = Callable[[], Awaitable[None]]  # see ``TeacherClient.complete``


@dataclass
class _Request:
    """One row's request across its attempts."""

    waited_s: float = 0.0  # time spent waiting for a usable endpoint (not charged to the row)
    endpoint: str = ""  # the endpoint of the latest attempt
    scored: Scored | None = None  # score mode: the tokenised row, once for all attempts


class TeacherClient:
    def __init__(
        self,
        spec: JobSpec,
        *,
        job_id: str,
        api_key: str | None = None,
        cap_per_endpoint: int | None = None,
        endpoints: list[str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        limiter: RateLimiter | None = None,
        on_pause: PauseListener | None = None,
    ) -> None:
        self.spec = spec
        self.k = spec.sampling.logprobs
        teacher = spec.teacher
        self.router = Router(
            endpoints or teacher.endpoints,
            cap_per_endpoint or spec.concurrency.in_flight_per_endpoint,
            health_check=self.healthy,
            outage_timeout_s=teacher.outage_timeout_s,
            pause_backoff=(teacher.backoff_initial_s, teacher.backoff_max_s),
            on_pause=on_pause,
        )
        headers = {"User-Agent": USER_AGENT, "X-Harvest-Job-Id": job_id}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        timeout = teacher.timeout_s
        self.limiter = limiter
        self._http = httpx.AsyncClient(
            headers=headers,
            verify=teacher.tls_verify,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            # Optionally aiohttp's pool under httpx's API: httpcore's pool cost more CPU than
            # parsing (workers/teacher/transport.py). Tests inject httpx.MockTransport here.
            transport=transport or _transport(spec),
        )
        self._direct = _direct(spec, headers) if transport is None else None
        self.counters: Counter[str] = Counter()  # retries and error classes seen
        self.stats = RequestStats()  # every exchange with an endpoint: status file, metrics

    def payload(self, row: PromptRow) -> dict[str, Any]:
        """The ``/v1/completions`` body for one input row (a chat row's prompt is added once the
        server has rendered the conversation: ``render``)."""
        if self.spec.mode == "score":
            return score_body(self.spec, row)
        params = sampling_for(self.spec, row)
        body: dict[str, Any] = {
            "model": self.spec.teacher.model,
            "max_tokens": params["max_tokens"],
            "temperature": params["temperature"],
            "top_p": params["top_p"],
            "n": params["n"],
            "logprobs": self.k,
            "return_tokens_as_token_ids": True,  # ids, never strings that can collide
            "return_token_ids": True,  # the prompt's ids, as the teacher saw them
        }
        if params["seed"] is not None:
            body["seed"] = params["seed"]
        if params["stop"]:
            body["stop"] = params["stop"]
        if row.messages is None:
            body["prompt"] = row.prompt
        return body

    async def render(self, endpoint: str, messages: list[dict[str, str]]) -> list[int]:
        """The conversation as the server's own chat template renders it (vLLM ``/tokenize``).

        Chat rows are sent to ``/v1/completions`` as these token ids: the chat API lists the
        sampled token first and cuts to ``top_logprobs``, losing the K-th alternative whenever
        the sampled token is outside the top K, and asking for K+1 instead breaks at vLLM's
        default ``--max-logprobs`` of 20. The completions API keeps all K and adds the sampled
        token, so top-K is exact at every K the server allows."""
        return await self.tokenize(endpoint, {"messages": messages, "add_generation_prompt": True})

    async def tokenize(self, endpoint: str, body: dict[str, Any]) -> list[int]:
        """The token ids vLLM's ``/tokenize`` gives for ``body`` (a prompt or messages)."""
        answer = await self._post(
            endpoint,
            endpoint.removesuffix("/v1") + "/tokenize",
            {"model": self.spec.teacher.model, **body},
        )
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise InvalidResponse("/tokenize did not answer a list of token ids", endpoint=endpoint)
        return tokens

    async def _send(self, endpoint: str, url: str, body: dict[str, Any]) -> Reply:
        try:
            return await _bounded(self._exchange(url, body), self.spec.teacher.timeout_s)
        except (httpx.TimeoutException, TimeoutError) as err:
            raise TeacherTimeout(f"timed out: {type(err).__name__}", endpoint=endpoint) from err
        except httpx.TransportError as err:
            raise TeacherUnavailable(f"{type(err).__name__}: {err}", endpoint=endpoint) from err
        except (OSError, AttributeError) as err:
            # Only the transport runs inside this try. When a server dies mid-connect, anyio can
            # fail outside httpx's exception tree (seen: AttributeError "'NoneType' object has no
            # attribute 'getpeername'" while a managed replica was killed): still a failed
            # exchange with this endpoint, not a reason to abort the whole job.
            raise TeacherUnavailable(f"{type(err).__name__}: {err}", endpoint=endpoint) from err

    async def _exchange(self, url: str, body: dict[str, Any]) -> Reply:
        if self._direct is not None:
            return await self._direct.post(url, orjson.dumps(body))
        resp = await self._http.post(
            url, content=orjson.dumps(body), headers={"Content-Type": "application/json"}
        )
        return Reply(resp.status_code, resp.headers, resp.content)

    async def _post(self, endpoint: str, url: str, body: dict[str, Any]) -> Any:
        content = await self._post_bytes(endpoint, url, body)
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError as err:
            raise InvalidResponse(f"body is not JSON: {err}", endpoint=endpoint) from err

    async def _post_bytes(self, endpoint: str, url: str, body: dict[str, Any]) -> bytes:
        """The body of a 200 answer; any other status raised as its ``HarvestError``."""
        started = time.perf_counter()
        try:
            resp = await self._send(endpoint, url, body)
        except HarvestError as err:
            self.stats.observe(endpoint, type(err).__name__, time.perf_counter() - started)
            raise
        self.stats.observe(endpoint, str(resp.status_code), time.perf_counter() - started)
        if resp.status_code != 200:
            raise error_for_status(
                resp.status_code,
                _error_message(resp),
                retry_after=parse_retry_after(resp.headers.get("retry-after")),
                endpoint=endpoint,
            )
        return resp.content

    async def complete(self, row: PromptRow, ready: Ready | None = None) -> Completion:
        """All samples for one row, retried per the policy; raises a ``HarvestError`` else.

        ``ready`` is awaited once an endpoint slot is held, right before each attempt is sent:
        the caller's back-pressure (a unit whose shard writer is behind), with the slot kept
        so no other request takes its place meanwhile."""
        body = self.payload(row)
        started = time.perf_counter()
        req = _Request()
        attempts = 0
        try:
            async for attempt in build_retrying(self.spec.teacher, lambda: req.waited_s):
                with attempt:
                    attempts += 1
                    if attempts > 1:
                        self.counters["retries"] += 1
                    answer = await self._attempt(row, body, req, ready)
        except HarvestError as err:
            self.stats.failed(type(err).__name__, str(err))
            raise err.final(attempts=attempts, endpoint=req.endpoint) from None
        return Completion(
            samples=answer.samples,
            prompt_tokens=answer.prompt_tokens,
            endpoint=req.endpoint,
            attempts=attempts,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            prompt_token_ids=answer.prompt_token_ids,
        )

    async def _attempt(
        self, row: PromptRow, body: dict[str, Any], req: _Request, ready: Ready | None
    ) -> Answer:
        """One attempt the row is charged for. A 429 pauses the endpoint, and a failure that
        takes the endpoint out of rotation is the teacher's fault: both wait for an endpoint
        (bounded by the router's outage deadline) and try again within this attempt."""
        while True:
            before = time.monotonic()
            async with self.router.acquire() as endpoint:
                if ready is not None:
                    await ready()
                req.waited_s += time.monotonic() - before
                req.endpoint = endpoint
                try:
                    if "prompt_logprobs" in body and req.scored is None:  # score mode
                        req.scored = await sequence(lambda b: self.tokenize(endpoint, b), row)
                        body["prompt"] = req.scored.ids
                    if "prompt" not in body:  # a chat row, rendered once for all attempts
                        body["prompt"] = await self.render(endpoint, row.messages or [])
                    answer = await self._generate(endpoint, body, req.scored)
                except RateLimited as err:
                    self.counters["RateLimited"] += 1
                    self.stats.error("RateLimited", str(err))
                    await self.router.pause(endpoint, err.retry_after)
                    continue
                except HarvestError as err:
                    self.counters[type(err).__name__] += 1
                    self.stats.error(type(err).__name__, str(err))
                    failed = _endpoint_failed(err)
                    if await self.router.report(endpoint, ok=not failed, reason=type(err).__name__):
                        continue
                    raise
                await self.router.report(endpoint, ok=True)
                return answer

    async def _generate(
        self, endpoint: str, body: dict[str, Any], scored: Scored | None = None
    ) -> Answer:
        """Send the completions request under a rate-limit permit; parse what comes back.

        A score request reserves the tokens it scores (it generates one, discarded)."""
        reserve = len(scored.ids) - 1 if scored else body["max_tokens"] * body["n"]
        # The permit is taken last, right before sending, so nothing between the limiter's
        # decision and the request leaving can bunch requests.
        permit = await self.limiter.acquire(reserve) if self.limiter else None
        used = reserve  # a failed attempt may still have cost the teacher tokens
        try:
            url = endpoint + "/completions"
            if scored is not None:
                raw = await self._post_bytes(endpoint, url, body)
                answer = read_scored(raw, scored, self.k)
            else:  # from the bytes: the top-K never become Python objects
                answer = read_completions(await self._post_bytes(endpoint, url, body), self.k)
            if len(answer.samples) != body["n"]:
                raise InvalidResponse(
                    f"asked for n={body['n']}, got {len(answer.samples)}", endpoint=endpoint
                )
            used = sum(len(s.token_ids) for s in answer.samples)
            return answer
        finally:  # also on cancellation: a permit is never leaked
            if permit is not None:
                await self.limiter.settle(permit, used)

    async def healthy(self, endpoint: str) -> bool:
        """vLLM's ``/health`` (beside ``/v1``), else the model list, answers 200."""
        for url in (endpoint.removesuffix("/v1") + "/health", endpoint + "/models"):
            try:
                resp = await self._http.get(url, timeout=5.0)
            except httpx.HTTPError:
                return False
            if resp.status_code != 404:
                return resp.status_code == 200
        return False

    async def aclose(self) -> None:
        await self.router.aclose()
        await self._http.aclose()
        if self._direct is not None:
            await self._direct.aclose()


def _direct(spec: JobSpec, headers: dict[str, str]) -> DirectPost | None:
    """aiohttp without httpx's models for the POSTs, when the job asks for that transport."""
    verify = spec.teacher.tls_verify
    if spec.teacher.transport != "aiohttp" or isinstance(verify, str):  # no CA bundle yet
        return None
    return DirectPost(
        {**headers, "Content-Type": "application/json"}, spec.teacher.timeout_s, verify=verify
    )


def _transport(spec: JobSpec) -> httpx.AsyncBaseTransport | None:
    verify = spec.teacher.tls_verify
    if spec.teacher.transport == "aiohttp" and not isinstance(verify, str):  # no CA bundle yet
        return AiohttpTransport(verify=verify)
    return None  # httpx's own


_LATE_S = 0.05  # a loop this late at the deadline was stalled, not waiting on the server


async def _bounded(exchange: Coroutine[Any, Any, Reply], limit: float) -> Reply:
    """``exchange`` within ``limit`` seconds, or ``TimeoutError``.

    httpx's timeouts are per read; this bounds the whole request, so a server that trickles
    bytes cannot hold a slot forever (closing the connection is what makes vLLM abort the
    abandoned generation). If the event loop itself was stalled past the deadline (a CPU-starved
    worker), the answer may already be in the socket: the exchange gets that lateness once more
    before it is given up, so an answered request is not reported as timed out and sent again
    (an always-400 prompt reached the teacher twice that way)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(exchange)
    try:
        due = loop.time() + limit
        done, _ = await asyncio.wait({task}, timeout=limit)
        late = loop.time() - due
        if not done and late > _LATE_S:
            done, _ = await asyncio.wait({task}, timeout=min(late, limit))
        if not done:
            raise TimeoutError(f"no answer within {limit:g} s")
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it close its connection; its error is moot


def _endpoint_failed(err: HarvestError) -> bool:
    """The endpoint itself is unwell (not the row, not a rate limit)."""
    if isinstance(err, TeacherUnavailable | TeacherTimeout):
        return True
    return isinstance(err, ServerError) and not isinstance(err, RateLimited)


def _error_message(resp: Reply) -> str:
    """The server's own error message if it sent one, else the status line; kept short."""
    text = resp.content[:2000].decode("utf-8", "replace")[:500]
    try:
        data = orjson.loads(resp.content)
        if isinstance(data, dict):
            err = data.get("error", data)
            msg = err.get("message") if isinstance(err, dict) else err
            if msg:
                text = str(msg)[:500]
    except orjson.JSONDecodeError:
        pass
    return f"HTTP {resp.status_code}: {text}" if text else f"HTTP {resp.status_code}"
