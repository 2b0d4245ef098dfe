"""Async client for a vLLM teacher's OpenAI-compatible API.

Plain asyncio, no Ray; HTTP goes through one ``Transport`` (aiohttp or httpx, see
workers/teacher/transport.py): unit tests inject an ``httpx.MockTransport`` under httpx. Each
request goes through the router (which endpoint), the retry policy (how often, how long to
wait) and the error taxonomy (what a failure means). It identifies itself with one stable
User-Agent and the job id, and never hides who is asking.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import orjson

from schemas.job import OVERRIDABLE, JobSpec
from schemas.requests import CompletionRequest, TokenizeRequest
from schemas.wire import Answer, Completion, PromptRow
from workers import USER_AGENT
from workers.answers.parse import read_completions
from workers.errors import (
    FatalError,
    HarvestError,
    InvalidResponse,
    RateLimited,
    ServerError,
    TeacherTimeout,
    TeacherUnavailable,
    error_for_status,
)
from workers.teacher.limits import completion_limit, tokenize_limit
from workers.teacher.retry import build_retrying, parse_retry_after
from workers.teacher.router import PauseListener, Router
from workers.teacher.score import (
    Scored,
    given_sequence,
    read_batch,
    score_request,
    score_sampling,
    sequence,
)
from workers.teacher.stats import RequestStats
from workers.teacher.transport import AiohttpTransport, HttpxTransport, Reply, Transport


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


def request_for(spec: JobSpec, row: PromptRow) -> CompletionRequest:
    """The row's ``/v1/completions`` request, its sampling computed here, once per row (a chat
    row's prompt is added once the server has rendered the conversation: ``render``)."""
    params = sampling_for(spec, row)
    if spec.mode == "score":
        return score_request(spec, row, params)
    return CompletionRequest(
        mode="generate",
        model=spec.teacher.model,
        max_tokens=params["max_tokens"],
        n=params["n"],
        temperature=params["temperature"],
        k=spec.sampling.logprobs,
        sampling=params,
        prompt=row.prompt if row.messages is None else None,
        top_p=params["top_p"],
        seed=params["seed"],
        stop=list(params["stop"] or ()),
    )


Ready = Callable[[], Awaitable[None]]  # see ``TeacherClient.complete``


@dataclass
class _Request:
    """One row's request across its attempts."""

    waited_s: float = 0.0  # time spent waiting for a usable endpoint (not charged to the row)
    endpoint: str = ""  # the endpoint of the latest attempt
    scored: list[Scored] | None = None  # score mode: the row(s) tokenised, once for all attempts


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
        self.limiter = limiter
        self._transport: Transport = _transport(spec, headers, transport)
        self.counters: Counter[str] = Counter()  # retries and error classes seen
        self.stats = RequestStats()  # every exchange with an endpoint: status file, metrics

    async def render(self, endpoint: str, messages: list[dict[str, str]]) -> list[int]:
        """The conversation as the server's own chat template renders it (vLLM ``/tokenize``).

        Chat rows are sent to ``/v1/completions`` as these token ids: the chat API lists the
        sampled token first and cuts to ``top_logprobs``, losing the K-th alternative whenever
        the sampled token is outside the top K, and asking for K+1 instead breaks at vLLM's
        default ``--max-logprobs`` of 20. The completions API keeps all K and adds the sampled
        token, so top-K is exact at every K the server allows."""
        return await self.tokenize(endpoint, {"messages": messages, "add_generation_prompt": True})

    async def tokenize(self, endpoint: str, body: dict[str, Any]) -> list[int]:
        """The token ids vLLM's ``/tokenize`` gives for ``body`` (a prompt or messages, in a
        ``TokenizeRequest``'s fields)."""
        content = orjson.dumps(TokenizeRequest(**body).body(self.spec.teacher.model))
        url = endpoint.removesuffix("/v1") + "/tokenize"
        answer = await self._post(endpoint, url, content, tokenize_limit(len(content)))
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise InvalidResponse("/tokenize did not answer a list of token ids", endpoint=endpoint)
        return tokens

    async def _send(self, endpoint: str, url: str, content: bytes, limit: int) -> Reply:
        """One exchange, bounded in time as a whole and in bytes by ``limit`` (what the request
        asks for); the transport has already mapped its failures to ``HarvestError``s."""
        try:
            exchange = self._transport.post(url, content, limit)
            return await _bounded(exchange, self.spec.teacher.timeout_s)
        except HarvestError as err:
            err.endpoint = err.endpoint or endpoint
            raise
        except TimeoutError as err:
            raise TeacherTimeout(f"timed out: {type(err).__name__}", endpoint=endpoint) from err

    async def _post(self, endpoint: str, url: str, content: bytes, limit: int) -> Any:
        answer = await self._post_bytes(endpoint, url, content, limit)
        try:
            return orjson.loads(answer)
        except orjson.JSONDecodeError as err:
            raise InvalidResponse(f"body is not JSON: {err}", endpoint=endpoint) from err

    async def _post_bytes(self, endpoint: str, url: str, content: bytes, limit: int) -> bytes:
        """The body of a 200 answer; any other status raised as its ``HarvestError``."""
        started = time.perf_counter()
        try:
            resp = await self._send(endpoint, url, content, limit)
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
                param=_error_param(resp),
            )
        return resp.content

    async def complete(
        self,
        row: PromptRow,
        ready: Ready | None = None,
        request: CompletionRequest | None = None,
        *,
        tried: int = 0,
    ) -> Completion:
        """All samples for one row, retried per the policy; raises a ``HarvestError`` else.

        ``ready`` is awaited once an endpoint slot is held, right before each attempt is sent:
        the caller's back-pressure (a unit whose shard writer is behind), with the slot kept
        so no other request takes its place meanwhile. ``request`` is the row's
        (``request_for``), when the caller has built it already; ``tried`` counts the row's
        earlier sends (in a batch that failed) into its attempts."""
        body = request or request_for(self.spec, row)
        started = time.perf_counter()
        req = _Request()
        attempts = tried
        try:
            async for attempt in build_retrying(self.spec.teacher, lambda: req.waited_s):
                with attempt:
                    attempts += 1
                    if attempts > 1:
                        self.counters["retries"] += 1
                    (answer,) = await self._attempt(row, body, req, ready)
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

    async def score_batch(
        self, rows: list[PromptRow], requests: list[CompletionRequest], ready: Ready | None = None
    ) -> list[Completion | HarvestError]:
        """Score mode: ids rows (``prompt_token_ids`` + ``token_ids``, nothing to tokenise) in
        one ``/v1/completions`` request, a list of prompts that vLLM answers with one choice
        each; one outcome per row, in order. ``requests`` are the rows' own (they differ only
        in the prompt; the first one's sampling is sent).

        The batch is sent once. If it fails for any reason but a fatal one (one row the teacher
        refuses fails the whole request, as would a timeout of the larger request), every row
        is sent again alone, with its own retries: one bad row becomes one failure record, and
        a row's ``attempts`` count the batch's send."""
        batch = [given_sequence(row) for row in rows]
        body = dataclasses.replace(requests[0], prompt=[s.ids for s in batch])
        started = time.perf_counter()
        req = _Request(scored=batch)
        try:
            answers = await self._attempt(None, body, req, ready)
        except FatalError as err:
            self.stats.failed(type(err).__name__, str(err))
            raise err.final(attempts=1, endpoint=req.endpoint) from None
        except HarvestError:
            self.counters["batches_split"] += 1
            pairs = zip(rows, requests, strict=True)
            return list(await asyncio.gather(*(self._alone(r, ready, q) for r, q in pairs)))
        latency_ms = (time.perf_counter() - started) * 1000.0
        return [
            Completion(
                samples=a.samples,
                prompt_tokens=a.prompt_tokens,
                endpoint=req.endpoint,
                attempts=1,
                latency_ms=latency_ms,
                prompt_token_ids=a.prompt_token_ids,
            )
            for a in answers
        ]

    async def _alone(
        self, row: PromptRow, ready: Ready | None, request: CompletionRequest
    ) -> Completion | HarvestError:
        """A row of a failed batch, sent on its own: its outcome (a fatal error still raises)."""
        try:
            return await self.complete(row, ready, request, tried=1)
        except FatalError:
            raise
        except HarvestError as err:
            return err

    async def _attempt(
        self, row: PromptRow | None, body: CompletionRequest, req: _Request, ready: Ready | None
    ) -> list[Answer]:
        """One attempt the row is charged for. A 429 pauses the endpoint, and a failure that
        takes the endpoint out of rotation is the teacher's fault: both wait for an endpoint
        (bounded by the router's outage deadline) and try again within this attempt."""
        while True:
            before = time.monotonic()
            async with self.router.acquire(len(req.scored) if req.scored else 1) as endpoint:
                if ready is not None:
                    await ready()
                req.waited_s += time.monotonic() - before
                req.endpoint = endpoint
                try:
                    if body.scoring and req.scored is None:  # tokenised once for all attempts
                        assert row is not None  # a batch comes with its sequences
                        scored = await sequence(lambda b: self.tokenize(endpoint, b), row)
                        req.scored, body.prompt = [scored], scored.ids
                    if body.prompt is None:  # a chat row, rendered once for all attempts
                        assert row is not None
                        body.prompt = await self.render(endpoint, row.messages or [])
                    answers = await self._generate(endpoint, body, req.scored)
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
                return answers

    async def _generate(
        self, endpoint: str, body: CompletionRequest, scored: list[Scored] | None = None
    ) -> list[Answer]:
        """Send the completions request under a rate-limit permit; parse what comes back: one
        answer per prompt (several only when scoring a batch).

        A score request reserves the tokens it scores (it generates one per prompt, discarded)."""
        reserve = sum(len(s.ids) - 1 for s in scored) if scored else body.max_tokens * body.n
        # The permit is taken last, right before sending, so nothing between the limiter's
        # decision and the request leaving can bunch requests.
        permit = await self.limiter.acquire(reserve) if self.limiter else None
        used = reserve  # a failed attempt may still have cost the teacher tokens
        try:
            url = endpoint + "/completions"
            content = orjson.dumps(body.body())
            limit = completion_limit(body, len(content))
            got = await self._post_bytes(endpoint, url, content, limit)
            if scored is not None:
                answers = read_batch(got, scored, self.k)
            else:  # from the bytes: the top-K never become Python objects
                answers = [read_completions(got, self.k)]
            for answer in answers:
                if len(answer.samples) != body.n:
                    raise InvalidResponse(
                        f"asked for n={body.n}, got {len(answer.samples)}", endpoint=endpoint
                    )
            used = sum(len(s.token_ids) for a in answers for s in a.samples)
            return answers
        finally:  # also on cancellation: a permit is never leaked
            if permit is not None:
                await self.limiter.settle(permit, used)

    async def healthy(self, endpoint: str) -> bool:
        """vLLM's ``/health`` (beside ``/v1``), else the model list, answers 200."""
        for url in (endpoint.removesuffix("/v1") + "/health", endpoint + "/models"):
            try:
                status = await self._transport.health(url)
            except HarvestError:
                return False
            if status != 404:
                return status == 200
        return False

    async def aclose(self) -> None:
        await self.router.aclose()
        await self._transport.aclose()


def _transport(
    spec: JobSpec, headers: dict[str, str], injected: httpx.AsyncBaseTransport | None
) -> Transport:
    """The job's transport; an injected httpx transport (tests) runs under httpx."""
    teacher = spec.teacher
    if teacher.transport == "aiohttp" and injected is None:
        headers = {**headers, "Content-Type": "application/json"}
        return AiohttpTransport(headers, teacher.timeout_s, verify=teacher.tls_verify)
    return HttpxTransport(headers, teacher.timeout_s, verify=teacher.tls_verify, transport=injected)


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


def _error_param(resp: Reply) -> str | None:
    """The structured ``error.param`` of an OpenAI-style error body (which request field the
    server refused), or None."""
    try:
        data = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    param = err.get("param") if isinstance(err, dict) else None
    return param if isinstance(param, str) else None


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
