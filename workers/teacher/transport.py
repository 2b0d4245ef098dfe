"""How the client talks HTTP: one interface (post bytes, get health), two libraries behind it.

``AiohttpTransport`` (the default) and ``HttpxTransport`` each map their own library's failures
once, straight into ``workers.errors``: a connection that failed (refused, reset, closed
mid-answer, a malformed status line) is ``TeacherUnavailable``, a connect or read timeout is
``TeacherTimeout``, a body past the request's bound is ``InvalidResponse``. Which one runs is
``teacher.transport``; a status code is the client's to judge (``error_for_status``).

aiohttp is the default because of CPU: profiling a worker at 64 requests in flight put more CPU
in httpcore's pool bookkeeping (``_assign_requests_to_connections`` scans every connection for
every queued request, about 2 million ``is_idle`` calls per 400 answers) than in parsing the
answers; encode/httpx#3215 describes it. httpx stays as a fallback and for unit tests, whose
``httpx.MockTransport`` plugs in under it.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from typing import NamedTuple, NoReturn, Protocol

import aiohttp
import httpx

from workers.errors import HarvestError, TeacherTimeout, TeacherUnavailable
from workers.teacher.limits import HEALTH_LIMIT, too_large

HEALTH_TIMEOUT_S = 5.0


class Reply(NamedTuple):
    """What the client reads of an answer."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive
    content: bytes


class Transport(Protocol):
    """POSTs a JSON body and GETs a health URL; raises only ``HarvestError``s (and
    cancellation)."""

    async def post(self, url: str, content: bytes, limit: int) -> Reply:
        """The answer, its body read up to ``limit`` bytes (past it: ``InvalidResponse``)."""
        ...

    async def health(self, url: str) -> int:
        """The status code of a GET (its body bounded by ``HEALTH_LIMIT``)."""
        ...

    async def aclose(self) -> None: ...


async def read_bounded(chunks: AsyncIterator[bytes], limit: int, declared: int | None) -> bytes:
    """A body read chunk by chunk, given up (``InvalidResponse``) once past ``limit`` bytes:
    never read whole first. A Content-Length past the limit is refused before any byte is read."""
    if declared is not None and declared > limit:
        raise too_large(limit, declared=declared)
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


class AiohttpTransport:
    """Both kinds of request over one ``aiohttp.ClientSession``, opened lazily (in the loop
    that uses it)."""

    def __init__(self, headers: Mapping[str, str], timeout: float, *, verify: bool | str) -> None:
        self._headers = dict(headers)
        self._timeout = aiohttp.ClientTimeout(sock_connect=min(10.0, timeout), sock_read=timeout)
        self._ssl: ssl.SSLContext | bool | None = None if verify is True else False
        if isinstance(verify, str):  # a CA bundle
            self._ssl = ssl.create_default_context(cafile=verify)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=self._ssl),
                # A teacher's answers carry no state between requests: no cookie is kept or
                # sent (the jar's per-request filtering was ~1.5 % of a score worker's CPU).
                cookie_jar=aiohttp.DummyCookieJar(),
                headers=self._headers,
                skip_auto_headers=("User-Agent",),  # ours is in the headers
            )
        return self._session

    async def post(self, url: str, content: bytes, limit: int) -> Reply:
        try:
            async with self._open().post(
                url, data=content, timeout=self._timeout, allow_redirects=False
            ) as resp:
                body = await read_bounded(resp.content.iter_any(), limit, resp.content_length)
                return Reply(resp.status, resp.headers, body)
        except HarvestError:
            raise
        except Exception as err:  # (cancellation is no Exception: it passes through)
            _raise_aiohttp(err)

    async def health(self, url: str) -> int:
        timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
        try:
            async with self._open().get(url, timeout=timeout, allow_redirects=False) as resp:
                await read_bounded(resp.content.iter_any(), HEALTH_LIMIT, resp.content_length)
                return resp.status
        except HarvestError:
            raise
        except Exception as err:
            _raise_aiohttp(err)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _raise_aiohttp(err: Exception) -> NoReturn:
    """aiohttp's failures as the harvest error that decides the action (from it)."""
    name = f"{type(err).__name__}: {err}"
    if isinstance(err, TimeoutError):  # aiohttp's sock_* timeouts (asyncio.TimeoutError)
        raise TeacherTimeout(f"timed out: {type(err).__name__}") from err
    if isinstance(err, aiohttp.ClientError | OSError):  # OSError: ConnectionError and kin
        raise TeacherUnavailable(name) from err
    raise err


class HttpxTransport:
    """Both kinds of request over one ``httpx.AsyncClient``; ``transport`` replaces httpx's
    own (tests inject an ``httpx.MockTransport``)."""

    def __init__(
        self,
        headers: Mapping[str, str],
        timeout: float,
        *,
        verify: bool | str,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            headers={**headers, "Content-Type": "application/json"},
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            transport=transport,
        )

    async def post(self, url: str, content: bytes, limit: int) -> Reply:
        try:
            async with self._http.stream("POST", url, content=content) as resp:
                body = await read_bounded(resp.aiter_bytes(), limit, _length(resp))
            return Reply(resp.status_code, resp.headers, body)
        except HarvestError:
            raise
        except Exception as err:
            _raise_httpx(err)

    async def health(self, url: str) -> int:
        try:
            async with self._http.stream("GET", url, timeout=HEALTH_TIMEOUT_S) as resp:
                await read_bounded(resp.aiter_bytes(), HEALTH_LIMIT, _length(resp))
            return resp.status_code
        except HarvestError:
            raise
        except Exception as err:
            _raise_httpx(err)

    async def aclose(self) -> None:
        await self._http.aclose()


def _length(resp: httpx.Response) -> int | None:
    declared = resp.headers.get("content-length")
    return int(declared) if declared and declared.isdigit() else None


def _raise_httpx(err: Exception) -> NoReturn:
    """httpx's failures as the harvest error that decides the action (from it)."""
    name = f"{type(err).__name__}: {err}"
    if isinstance(err, httpx.TimeoutException):
        raise TeacherTimeout(f"timed out: {type(err).__name__}") from err
    if isinstance(err, httpx.TransportError | OSError | AttributeError):
        # AttributeError: when a server dies mid-connect, anyio can fail outside httpx's tree
        # (seen: "'NoneType' object has no attribute 'getpeername'" while a managed replica was
        # killed): still a failed exchange with this endpoint, not a reason to abort the job.
        raise TeacherUnavailable(name) from err
    raise err
