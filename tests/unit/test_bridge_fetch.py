"""Where each kind of task URL is fetched from, and which origins are refused (no I/O here)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from core.errors import ConfigError, FetchError
from core.fetch import ImageFetcher
from core.settings import Settings, load_settings


def _resolve(url: str, task_id: int | None = 12, **settings: object) -> str:
    async def run() -> str:
        fetcher = ImageFetcher(Settings(**settings))  # type: ignore[arg-type]
        try:
            target = fetcher.resolve(url, task_id)
            fetcher.check_origin(target)
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


def test_plain_urls_need_an_allowed_origin() -> None:
    assert _resolve("https://images.example.com/a.jpg", allowed_origins="https://images.example.com") == (
        "https://images.example.com/a.jpg"
    )
    # Default ports are explicit on both sides: https://h == https://h:443.
    assert _resolve("https://images.example.com:443/a.jpg", allowed_origins="https://images.example.com:443/")
    assert (
        _resolve("http://cdn.test:9000/a.jpg", allowed_origins="http://cdn.test:9000") == "http://cdn.test:9000/a.jpg"
    )
    assert _resolve("http://LS.local:8080/data/upload/1/a.png", **LS).startswith("http://ls.local")
    with pytest.raises(FetchError, match=r"'http://evil.test:80' is not allowed \(allowed: http://ls.local:8080\)"):
        _resolve("http://evil.test/a.jpg", **LS)
    with pytest.raises(FetchError, match="LABELLOOP_ALLOWED_ORIGINS"):
        _resolve("http://cdn.test:9001/a.jpg", allowed_origins="http://cdn.test:9000")


@pytest.mark.parametrize(
    "url",
    [
        "http://ls.local:22/",  # ssh
        "http://ls.local:8000/v2/models/defect_detector/load",  # Triton HTTP
        "http://ls.local:8002/metrics",  # Triton metrics
        "http://ls.local/data/upload/1/a.png",  # port 80, not Label Studio's 8080
        "https://ls.local:8080/data/upload/1/a.png",  # another scheme
        "http://ls.local.evil.test:8080/a.png",
    ],
)
def test_the_label_studio_host_is_allowed_on_its_own_origin_only(url: str) -> None:
    with pytest.raises(FetchError, match="is not allowed"):
        _resolve(url, **LS)


def test_https_origins_do_not_admit_http() -> None:
    with pytest.raises(FetchError, match="'http://images.example.com:80' is not allowed"):
        _resolve("http://images.example.com/a.jpg", allowed_origins="https://images.example.com")


@pytest.mark.parametrize(
    "entry",
    ["images.example.com", "images.example.com:443", "ftp://images.example.com", "https://h/path", "https://h:99999"],
)
def test_an_allowed_origin_must_be_an_exact_origin(entry: str) -> None:
    with pytest.raises(ConfigError, match=r"not an origin.*scheme://host\[:port\]"):
        load_settings(allowed_origins=entry)


def test_the_old_allowed_hosts_key_names_its_replacement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELLOOP_ALLOWED_HOSTS", "images.example.com")
    with pytest.raises(ConfigError, match="allowed_origins"):
        load_settings()


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://[::1/a.png", "ValueError"),
        ("http://ls.local:8080/\x00.png", "InvalidURL"),
        ("http://ls.local:abc/a.png", "InvalidURL"),
        ("s3://[bucket/a.png", "ValueError"),
    ],
)
def test_malformed_urls_are_fetch_errors(url: str, error: str) -> None:
    with pytest.raises(FetchError, match=f"malformed URL \\({error}"):
        _resolve(url, **LS)


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
