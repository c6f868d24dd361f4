"""The fetcher against a real http server and real files: limits, refused origins (never contacted), redirects,
local roots."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
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
        fetcher = ImageFetcher(Settings(allowed_origins=f"http://{server.host}", **settings))  # type: ignore[arg-type]
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
    with pytest.raises(FetchError, match=r"image origin 'http://localhost:\d+' is not allowed"):
        _fetch(server, other)
    assert sum(server.hits.values()) == before


def test_redirects_are_checked_hop_by_hop(server: ImageServer) -> None:
    assert _fetch(server, f"redirect?to={server.url('image.bin')}") == PAYLOAD
    other = f"http://localhost:{server.server_address[1]}/image.bin"
    hits = server.hits["/image.bin"]
    with pytest.raises(FetchError, match="'http://localhost:.*' is not allowed"):
        _fetch(server, f"redirect?to={other}")
    assert server.hits["/image.bin"] == hits


def test_connection_refused_is_a_fetch_error(tmp_path: Path) -> None:
    with ImageServer(tmp_path) as closed:
        host = closed.host

    async def run() -> bytes:
        fetcher = ImageFetcher(Settings(allowed_origins=f"http://{host}"))
        try:
            return await fetcher.fetch(f"http://{host}/a.png")
        finally:
            await fetcher.aclose()

    with pytest.raises(FetchError, match="ConnectError"):
        asyncio.run(run())


class ConnectionRecorder:
    """A real listening socket on 127.0.0.1 that counts the connections made to it (and closes them)."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, name="recorder", daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def __enter__(self) -> ConnectionRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
        self._thread.join(timeout=5)


def _fetch_from(url: str, **settings: object) -> bytes:
    async def run() -> bytes:
        fetcher = ImageFetcher(Settings(**settings))  # type: ignore[arg-type]
        try:
            return await fetcher.fetch(url, task_id=1)
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def test_the_label_studio_host_on_another_port_is_never_contacted(server: ImageServer) -> None:
    """Label Studio's host is allowed on Label Studio's port only: not Triton's HTTP or metrics port, not 22."""
    label_studio = f"http://{server.host}"  # 127.0.0.1:<port>, as `up` runs Label Studio
    with ConnectionRecorder() as other_port:
        for path in ("/v2/models/defect_detector/load", "/metrics", "/"):
            with pytest.raises(FetchError, match=rf"'http://127.0.0.1:{other_port.port}' is not allowed"):
                _fetch_from(f"http://127.0.0.1:{other_port.port}{path}", label_studio_url=label_studio)
        # Through Label Studio's own origin, a redirect to the other port is refused before its hop too.
        hop = f"{label_studio}/redirect?to=http://127.0.0.1:{other_port.port}/metrics"
        with pytest.raises(FetchError, match="is not allowed"):
            _fetch_from(hop, label_studio_url=label_studio)
        assert other_port.connections == 0
        # The recorder does see a fetch that is allowed to reach it (so 0 above means "never contacted").
        with pytest.raises(FetchError):
            _fetch_from(f"http://127.0.0.1:{other_port.port}/x", allowed_origins=f"http://127.0.0.1:{other_port.port}")
        assert other_port.connections >= 1
    with pytest.raises(FetchError, match="'http://127.0.0.1:22' is not allowed"):
        _fetch_from("http://127.0.0.1:22/", label_studio_url=label_studio)


def test_local_files_are_read_only_under_their_roots(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a b.png").write_bytes(PAYLOAD)
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    (root / "link.png").symlink_to(outside)
    (root / "inner-link.png").symlink_to(root / "sub" / "a b.png")
    os.mkfifo(root / "pipe.png")
    roots = {"local_file_roots": str(root)}

    assert _fetch_from(f"file://{root}/sub/a%20b.png", **roots) == PAYLOAD
    assert _fetch_from(f"file://{root}/inner-link.png", **roots) == PAYLOAD
    for url, message in [
        (f"file://{root}/link.png", "is outside local_file_roots"),  # a symlink out of the root
        (f"file://{root}/sub/../../secret.txt", "is outside local_file_roots"),
        (f"file://{root}/missing.png", "FileNotFoundError"),
        (f"file://{root}/pipe.png", "not a regular file"),
        (f"file://otherhost{root}/sub/a%20b.png", "must name a local path"),
    ]:
        with pytest.raises(FetchError, match=message):
            _fetch_from(url, **roots)
    with pytest.raises(FetchError, match="none is set"):
        _fetch_from(f"file://{root}/sub/a%20b.png")
    with pytest.raises(FetchError, match="over the 1000-byte limit"):
        _fetch_from(f"file://{root}/sub/a%20b.png", max_image_bytes=1000, **roots)
