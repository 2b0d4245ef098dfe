"""An httpx transport that sends through aiohttp: httpx's API, aiohttp's connection pool.

Profiling a worker at 64 requests in flight put more CPU in httpcore's pool bookkeeping
(``_assign_requests_to_connections`` scans every connection for every queued request, about
2 million ``is_idle`` calls per 400 answers) than in parsing the answers; encode/httpx#3215
describes it. aiohttp's pool does not. Behind ``httpx.AsyncBaseTransport`` the client keeps its
interface, its tests' ``MockTransport`` and its error taxonomy: every aiohttp failure is raised
as the httpx exception a client already handles (connect/read errors, a body cut short).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import NamedTuple, NoReturn

import aiohttp
import httpx

from workers.teacher.limits import HEALTH_LIMIT, too_large

LIMIT = "harvest.body_limit"  # the request extension that bounds an answer's bytes

# What aiohttp may raise while talking to one server, as httpx's exceptions.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # a malformed status line
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientError, httpx.NetworkError),
    (ConnectionError, httpx.ReadError),
)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Buffered requests and responses over one ``aiohttp.ClientSession``, opened lazily."""

    def __init__(self, *, verify: bool = True) -> None:
        self._verify = verify
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ssl=None if self._verify else False)
            # No timeouts here: the client bounds each request (asyncio.timeout), and httpx's
            # per-request timeout reaches the transport as an extension, applied below.
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,  # httpx decodes, from the headers it is given
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._open()
        body = await request.aread()
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "host"]
        try:
            async with session.request(
                request.method,
                str(request.url),
                data=body or None,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                limit = request.extensions.get(LIMIT, HEALTH_LIMIT)
                content = await read_bounded(resp.content.iter_any(), limit, resp.content_length)
                return httpx.Response(
                    resp.status,
                    headers=list(resp.raw_headers),
                    content=content,
                    request=request,
                )
        except Exception as err:
            _raise_as_httpx(err, request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _raise_as_httpx(err: Exception, request: httpx.Request | None) -> NoReturn:
    """Raise the httpx exception for an aiohttp failure (from it), or the error itself when it
    is none of those."""
    if isinstance(err, TimeoutError):  # aiohttp's sock_* timeouts (asyncio.TimeoutError)
        raise httpx.ReadTimeout(str(err) or "timed out", request=request) from err
    for source, target in _ERRORS:
        if isinstance(err, source):
            raise target(f"{type(err).__name__}: {err}", request=request) from err
    raise err


async def read_bounded(chunks: AsyncIterator[bytes], limit: int, declared: int | None) -> bytes:
    """A body read chunk by chunk, given up (``InvalidResponse``) once past ``limit`` bytes: never
    read whole first. A Content-Length past the limit is refused before any byte is read."""
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


class Reply(NamedTuple):
    """What the client reads of an answer."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive
    content: bytes


class DirectPost:
    """POSTs through one aiohttp session, answers decoded, failures as httpx exceptions."""

    def __init__(self, headers: Mapping[str, str], timeout: float, *, verify: bool) -> None:
        self._headers = dict(headers)
        self._timeout = aiohttp.ClientTimeout(sock_connect=min(10.0, timeout), sock_read=timeout)
        self._verify = verify
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, content: bytes, limit: int) -> Reply:
        """The answer to one POST, its body read up to ``limit`` bytes (else InvalidResponse)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=None if self._verify else False),
                headers=self._headers,
                skip_auto_headers=("User-Agent",),  # ours is in the headers
            )
        try:
            async with self._session.post(
                url, data=content, timeout=self._timeout, allow_redirects=False
            ) as resp:
                body = await read_bounded(resp.content.iter_any(), limit, resp.content_length)
                return Reply(resp.status, resp.headers, body)
        except Exception as err:  # (cancellation is no Exception: it passes through)
            _raise_as_httpx(err, None)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
