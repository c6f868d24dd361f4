"""Where each kind of task URL is fetched from, and which hosts are refused (no I/O here)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from core.errors import FetchError
from core.fetch import ImageFetcher
from core.settings import Settings


def _resolve(url: str, task_id: int | None = 12, **settings: object) -> str:
    async def run() -> str:
        fetcher = ImageFetcher(Settings(**settings))  # type: ignore[arg-type]
        try:
            target = fetcher.resolve(url, task_id)
            fetcher.check_host(target)
            return str(target)
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


LS: dict[str, Any] = {"label_studio_url": "http://ls.local:8080/"}


def test_uploads_and_local_files_go_to_label_studio() -> None:
    assert _resolve("/data/upload/3/ab12-part.png", **LS) == "http://ls.local:8080/data/upload/3/ab12-part.png"
    assert (
        _resolve("/data/local-files/?d=parts/a%20b.jpg", **LS)
        == "http://ls.local:8080/data/local-files/?d=parts/a%20b.jpg"
    )


def test_label_studio_under_a_path_prefix_keeps_it() -> None:
    url = _resolve("/data/upload/3/a.png", label_studio_url="https://example.org/ls")
    assert url == "https://example.org/ls/data/upload/3/a.png"


def test_cloud_uris_go_through_the_task_presign_endpoint() -> None:
    url = _resolve("s3://bucket/parts/a.jpg", task_id=12, **LS)
    encoded = base64.urlsafe_b64encode(b"s3://bucket/parts/a.jpg").decode()
    assert url == f"http://ls.local:8080/tasks/12/presign/?fileuri={encoded.replace('=', '%3D')}"
    with pytest.raises(FetchError, match="needs the task id"):
        _resolve("gs://bucket/a.jpg", task_id=None, **LS)


def test_plain_urls_need_an_allowed_host() -> None:
    assert _resolve("https://images.example.com/a.jpg", allowed_hosts="images.example.com") == (
        "https://images.example.com/a.jpg"
    )
    assert _resolve("http://cdn.test:9000/a.jpg", allowed_hosts="cdn.test:9000") == "http://cdn.test:9000/a.jpg"
    assert _resolve("http://LS.local:8080/data/upload/1/a.png", **LS).startswith("http://ls.local")
    with pytest.raises(FetchError, match=r"'evil.test' is not allowed \(allowed: ls.local, ls.local:8080\)"):
        _resolve("http://evil.test/a.jpg", **LS)
    with pytest.raises(FetchError, match="LABELLOOP_ALLOWED_HOSTS"):
        _resolve("http://cdn.test:9001/a.jpg", allowed_hosts="cdn.test:9000")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "no image URL"),
        ("data:image/png;base64,AAAA", "not a URL the bridge can fetch"),
        ("parts/a.jpg", "not a URL the bridge can fetch"),
    ],
)
def test_unfetchable_values(url: str, message: str) -> None:
    with pytest.raises(FetchError, match=message):
        _resolve(url, **LS)


def test_label_studio_files_need_its_url() -> None:
    with pytest.raises(FetchError, match="set LABEL_STUDIO_URL"):
        _resolve("/data/upload/3/a.png")
