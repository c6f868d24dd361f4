"""An httpx transport that sends requests over aiohttp's connection pool.

Why: the bridge downloads every task image, and httpx's own transport (httpcore, h11 and anyio, all
pure Python) cost about 0.9 CPU-ms per 32 KB image on a 2-core box, a twentieth of everything one
pre-label costs; aiohttp parses HTTP in C for about 0.1 (README, Performance). httpx stays the
client: auth flows (Label Studio's token refresh), redirects checked hop by hop, streaming and
its errors are unchanged, so only the wire moves.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import aiohttp
import httpx

__all__ = ["AiohttpTransport"]

_CHUNK = 64 * 1024


class _Body(httpx.AsyncByteStream):
    """An aiohttp response body as an httpx stream; closing it hands the connection back."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(_CHUNK):
                yield chunk
        except aiohttp.ClientPayloadError as exc:
            raise httpx.RemoteProtocolError(f"body cut short: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        except asyncio.TimeoutError as exc:
            raise httpx.ReadTimeout("no data within the read timeout") from exc

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx requests on a pool of at most ``max_connections`` aiohttp connections.

    Create it inside the event loop that uses it. Bodies reach httpx undecoded, so httpx decodes
    gzip/deflate itself, as with its own transport; TLS uses httpx's default context (certifi).
    """

    def __init__(self, max_connections: int, verify: ssl.SSLContext | None = None) -> None:
        self._connector = aiohttp.TCPConnector(limit=max_connections, ssl=verify or httpx.create_ssl_context())
        self._session = aiohttp.ClientSession(connector=self._connector, auto_decompress=False, trust_env=False)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        try:
            response = await self._session.request(
                request.method,
                str(request.url),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                data=await request.aread() or None,
                allow_redirects=False,
                timeout=timeout,
            )
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except asyncio.TimeoutError as exc:
            raise httpx.TimeoutException("no answer within the timeout", request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(str(exc) or type(exc).__name__, request=request) from exc
        return httpx.Response(
            response.status,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
            stream=_Body(response),
            request=request,
        )

    async def aclose(self) -> None:
        await self._session.close()
