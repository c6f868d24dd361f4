"""The fetcher against a real http server: limits, refused hosts (never contacted), redirects."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.errors import FetchError
from core.fetch import ImageFetcher
from core.settings import Settings
from core.transport import AiohttpTransport
from tests.integration.conftest import ImageServer

PAYLOAD = bytes(range(256)) * 400  # 102400 bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageServer]:
    root = tmp_path_factory.mktemp("files")
    (root / "image.bin").write_bytes(PAYLOAD)
    with ImageServer(root) as running:
        yield running


def _fetch(server: ImageServer, path_or_url: str, **settings: object) -> bytes:
    url = path_or_url if path_or_url.startswith("http") else server.url(path_or_url)

    async def run() -> bytes:
        fetcher = ImageFetcher(Settings(allowed_hosts=server.host, **settings))  # type: ignore[arg-type]
        try:
            return await fetcher.fetch(url, task_id=1)
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def test_allowed_host_is_fetched(server: ImageServer) -> None:
    assert _fetch(server, "image.bin") == PAYLOAD


def test_size_limit_aborts_the_download(server: ImageServer) -> None:
    with pytest.raises(FetchError, match="102400 bytes is over the 50000-byte limit"):
        _fetch(server, "image.bin", max_image_bytes=50_000)
    assert _fetch(server, "image.bin", max_image_bytes=len(PAYLOAD)) == PAYLOAD


def test_time_limit(server: ImageServer) -> None:
    with pytest.raises(FetchError, match=r"not downloaded within 0.5s"):
        _fetch(server, "slow/image.bin", fetch_timeout_s=0.5)


def test_content_encoding_is_decoded_once(server: ImageServer) -> None:
    assert _fetch(server, "gzip/image.bin") == PAYLOAD


def test_a_body_cut_short_is_a_fetch_error(server: ImageServer) -> None:
    with pytest.raises(FetchError, match="RemoteProtocolError"):
        _fetch(server, "cut/image.bin")


def test_the_transport_raises_httpx_errors(server: ImageServer) -> None:
    """aiohttp's errors reach httpx (and so the fetcher's messages) as httpx's own transport raises them."""

    async def get(path: str, timeout: float = 5.0) -> bytes:
        async with httpx.AsyncClient(transport=AiohttpTransport(max_connections=2), timeout=timeout) as client:
            return (await client.get(server.url(path))).content

    assert asyncio.run(get("image.bin")) == PAYLOAD
    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(get("slow/image.bin", timeout=0.3))
    with pytest.raises(httpx.RemoteProtocolError):
        asyncio.run(get("cut/image.bin"))


def test_missing_file_is_a_fetch_error(server: ImageServer) -> None:
    with pytest.raises(FetchError, match="HTTP 404"):
        _fetch(server, "nothing-here.png")


def test_other_hosts_are_refused_without_connecting(server: ImageServer) -> None:
    # "localhost" reaches the very same server, so a connection would show up in its hits.
    other = f"http://localhost:{server.server_address[1]}/image.bin"
    before = sum(server.hits.values())
    with pytest.raises(FetchError, match=r"image host 'localhost:\d+' is not allowed"):
        _fetch(server, other)
    assert sum(server.hits.values()) == before


def test_redirects_are_checked_hop_by_hop(server: ImageServer) -> None:
    assert _fetch(server, f"redirect?to={server.url('image.bin')}") == PAYLOAD
    other = f"http://localhost:{server.server_address[1]}/image.bin"
    hits = server.hits["/image.bin"]
    with pytest.raises(FetchError, match="'localhost:.*' is not allowed"):
        _fetch(server, f"redirect?to={other}")
    assert server.hits["/image.bin"] == hits


def test_connection_refused_is_a_fetch_error(tmp_path: Path) -> None:
    with ImageServer(tmp_path) as closed:
        host = closed.host

    async def run() -> bytes:
        fetcher = ImageFetcher(Settings(allowed_hosts=host))
        try:
            return await fetcher.fetch(f"http://{host}/a.png")
        finally:
            await fetcher.aclose()

    with pytest.raises(FetchError, match="ConnectError"):
        asyncio.run(run())
