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
from typing import Any, Protocol

import httpx
import orjson

from schemas.job import OVERRIDABLE, JobSpec
from schemas.wire import Completion, PromptRow
from workers import USER_AGENT
from workers.errors import (
    HarvestError,
    InvalidResponse,
    RateLimited,
    ServerError,
    TeacherTimeout,
    TeacherUnavailable,
    error_for_status,
)
from workers.parse import parse_chat, parse_completions
from workers.retry import build_retrying, parse_retry_after
from workers.router import Router


class RateLimiter(Protocol):
    """Job-wide request/token limits (``workers.limiter.Limiter`` or its Ray actor)."""

    async def acquire(self, max_tokens: int) -> int: ...
    async def settle(self, handle: int, used_tokens: int) -> None: ...


def sampling_for(spec: JobSpec, row: PromptRow) -> dict[str, Any]:
    """The job's sampling parameters with this row's overrides applied."""
    params = spec.sampling.model_dump(include=set(OVERRIDABLE))
    params.update(row.overrides)
    return params


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
    ) -> None:
        self.spec = spec
        self.k = spec.sampling.logprobs
        self.router = Router(
            endpoints or spec.teacher.endpoints,
            cap_per_endpoint or spec.concurrency.in_flight_per_endpoint,
            health_check=self.healthy,
        )
        headers = {"User-Agent": USER_AGENT, "X-Harvest-Job-Id": job_id}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        timeout = spec.teacher.timeout_s
        self.limiter = limiter
        self._http = httpx.AsyncClient(
            headers=headers,
            verify=spec.teacher.tls_verify,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            transport=transport,
        )
        self.counters: Counter[str] = Counter()  # retries and error classes seen

    def payload(self, row: PromptRow) -> tuple[str, dict[str, Any]]:
        """Request path and JSON body for one input row."""
        params = sampling_for(self.spec, row)
        body: dict[str, Any] = {
            "model": self.spec.teacher.model,
            "max_tokens": params["max_tokens"],
            "temperature": params["temperature"],
            "top_p": params["top_p"],
            "n": params["n"],
            "return_tokens_as_token_ids": True,
        }
        if params["seed"] is not None:
            body["seed"] = params["seed"]
        if params["stop"]:
            body["stop"] = params["stop"]
        if row.messages is not None:
            # vLLM's chat API lists the sampled token first and then cuts the list to
            # top_logprobs entries, so asking for exactly K loses the K-th best alternative
            # whenever the sampled token is outside the top K. Ask for K+1 and let the parser
            # sort and cut (this needs the server's --max-logprobs >= K+1).
            body.update(
                messages=row.messages, logprobs=True, top_logprobs=self.k + 1 if self.k else 0
            )
            return "/chat/completions", body
        body.update(prompt=row.prompt, logprobs=self.k)
        return "/completions", body

    async def _post(self, endpoint: str, path: str, body: dict[str, Any]) -> Any:
        try:
            # httpx's timeouts are per read; this bounds the whole request, so a server that
            # trickles bytes cannot hold a slot forever. Closing the connection on timeout is
            # what makes vLLM abort the abandoned generation.
            async with asyncio.timeout(self.spec.teacher.timeout_s):
                resp = await self._http.post(
                    endpoint + path,
                    content=orjson.dumps(body),
                    headers={"Content-Type": "application/json"},
                )
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
        if resp.status_code != 200:
            raise error_for_status(
                resp.status_code,
                _error_message(resp),
                retry_after=parse_retry_after(resp.headers.get("retry-after")),
                endpoint=endpoint,
            )
        try:
            return orjson.loads(resp.content)
        except orjson.JSONDecodeError as err:
            raise InvalidResponse(f"body is not JSON: {err}", endpoint=endpoint) from err

    async def complete(self, row: PromptRow) -> Completion:
        """All samples for one row, retried per the policy; raises a ``HarvestError`` else."""
        path, body = self.payload(row)
        parse = parse_chat if row.messages is not None else parse_completions
        started = time.perf_counter()
        reserve = body["max_tokens"] * body["n"]
        attempts = 0
        async for attempt in build_retrying(self.spec.teacher):
            with attempt:
                attempts += 1
                if attempts > 1:
                    self.counters["retries"] += 1
                permit = None
                used = reserve  # a failed attempt may still have cost the teacher tokens
                try:
                    async with self.router.acquire() as endpoint:
                        # The permit is taken last, right before sending, so nothing between
                        # the limiter's decision and the request leaving can bunch requests.
                        permit = await self.limiter.acquire(reserve) if self.limiter else None
                        try:
                            answer = await self._post(endpoint, path, body)
                            samples, prompt_tokens = parse(answer, self.k)
                            if len(samples) != body["n"]:
                                raise InvalidResponse(
                                    f"asked for n={body['n']}, got {len(samples)}"
                                )
                            used = sum(len(s.token_ids) for s in samples)
                        except HarvestError as err:
                            err.endpoint = endpoint
                            err.attempts = attempts
                            self.counters[type(err).__name__] += 1
                            await self.router.report(endpoint, ok=not _endpoint_failed(err))
                            raise
                        await self.router.report(endpoint, ok=True)
                finally:  # also on cancellation: a permit is never leaked
                    if permit is not None:
                        await self.limiter.settle(permit, used)
        return Completion(
            samples=samples,
            prompt_tokens=prompt_tokens,
            endpoint=endpoint,
            attempts=attempts,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )

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


def _endpoint_failed(err: HarvestError) -> bool:
    """The endpoint itself is unwell (not the row, not a rate limit)."""
    if isinstance(err, TeacherUnavailable | TeacherTimeout):
        return True
    return isinstance(err, ServerError) and not isinstance(err, RateLimited)


def _error_message(resp: httpx.Response) -> str:
    """The server's own error message if it sent one, else the status line; kept short."""
    text = resp.text[:500]
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
