"""An httpx transport that sends requests over aiohttp's connection pool.

Why: the bridge downloads every task image, and httpx's own transport (httpcore, h11 and anyio, all
pure Python) cost about 0.9 CPU-ms per 32 KB image on a 2-core box; on aiohttp, which parses HTTP
in C, the same download through httpx costs about 0.4 (docs/performance.md). httpx stays the
client: auth flows (Label Studio's token refresh), redirects checked hop by hop, streaming and its
errors are unchanged, so only the wire moves.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import httpx

__all__ = ["AiohttpTransport"]

_CHUNK = 64 * 1024
# aiohttp's errors -> the httpx errors httpx's own transport raises; the first match wins.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (asyncio.TimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientError, httpx.NetworkError),
)


@contextmanager
def _mapped_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        mapped = next(target for source, target in _ERRORS if isinstance(exc, source))
        raise mapped(str(exc) or type(exc).__name__, request=request) from exc


class _Body(httpx.AsyncByteStream):
    """An aiohttp response body as an httpx stream; closing it hands the connection back."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped_errors(self._request):
            async for chunk in self._response.content.iter_chunked(_CHUNK):
                yield chunk

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx requests on a pool of at most ``max_connections`` aiohttp connections.

    Create it inside the event loop that uses it. Bodies reach httpx undecoded, so httpx decodes
    gzip/deflate itself, as with its own transport; TLS uses httpx's default context (certifi).
    """

    def __init__(self, max_connections: int, verify: ssl.SSLContext | None = None) -> None:
        connector = aiohttp.TCPConnector(limit=max_connections, ssl=verify or httpx.create_ssl_context())
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        with _mapped_errors(request):
            response = await self._session.request(
                request.method,
                str(request.url),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                data=await request.aread() or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(sock_connect=timeouts.get("connect"), sock_read=timeouts.get("read")),
            )
        return httpx.Response(
            response.status,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
            stream=_Body(response, request),
            request=request,
        )

    async def aclose(self) -> None:
        await self._session.close()
