"""Download task images: Label Studio uploads, local files, cloud storage and plain http(s).

Where a task URL points, and how it is fetched:

    /data/upload/<project>/<file>     Label Studio, with its credentials
    /data/local-files/?d=<path>       Label Studio (LOCAL_FILES_SERVING_ENABLED), with its credentials
    s3://, gs://, azure-blob://, ...  Label Studio's ``/tasks/<id>/presign/?fileuri=<base64>``, which
                                      proxies the file or redirects to a presigned URL
    http(s)://host/...                directly

Only the Label Studio host and ``allowed_hosts`` are ever contacted; any other host (redirect targets
included) is refused before a connection is made. Downloads are bounded in number
(``fetch_concurrency``), size (``max_image_bytes``, checked while streaming) and time
(``fetch_timeout_s`` per image, redirects included). Every failure is a ``FetchError``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from urllib.parse import urlsplit

import httpx

from core.errors import FetchError
from core.settings import Settings
from core.studio_auth import LabelStudioAuth
from core.transport import AiohttpTransport

__all__ = ["ImageFetcher", "make_auth"]

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_DIRECT_SCHEMES = frozenset({"http", "https"})
_SHOWN_URL_CHARS = 200


def make_auth(settings: Settings) -> LabelStudioAuth | None:
    """Credentials for Label Studio when both its URL and a key are configured."""
    if not settings.label_studio_url or settings.label_studio_api_key is None:
        return None
    return LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key.get_secret_value())


def _shown(url: str) -> str:
    return url if len(url) <= _SHOWN_URL_CHARS else url[: _SHOWN_URL_CHARS - 3] + "..."


def _host_key(url: httpx.URL) -> tuple[str, str]:
    host = url.host.lower()
    return host, f"{host}:{url.port}" if url.port else host


class ImageFetcher:
    """Fetches task images; create it inside the event loop that uses it, and ``aclose`` it."""

    def __init__(self, settings: Settings, auth: LabelStudioAuth | None = None) -> None:
        self._base = settings.label_studio_url.rstrip("/") if settings.label_studio_url else None
        self._allowed = frozenset(h.lower() for h in settings.allowed_hosts)
        if self._base:
            self._allowed |= set(_host_key(httpx.URL(self._base)))
        self._max_bytes = settings.max_image_bytes
        self._timeout_s = settings.fetch_timeout_s
        self._slots = asyncio.Semaphore(settings.fetch_concurrency)
        self.auth = auth if auth is not None else make_auth(settings)
        self._client = httpx.AsyncClient(
            auth=self.auth,
            timeout=httpx.Timeout(settings.fetch_timeout_s),
            transport=AiohttpTransport(max_connections=settings.fetch_concurrency),
            follow_redirects=False,  # each hop is checked against the allowlist first
            trust_env=False,  # a proxy would contact hosts the allowlist never saw
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def allowed_hosts(self) -> frozenset[str]:
        return self._allowed

    def resolve(self, url: str, task_id: int | None = None) -> httpx.URL:
        """The URL to download for a task's image value (no I/O)."""
        url = url.strip()
        if not url:
            raise FetchError("the task has no image URL")
        scheme = urlsplit(url).scheme.lower()
        if scheme in _DIRECT_SCHEMES:
            return httpx.URL(url)
        if self._base is None and (url.startswith("/") or scheme):
            raise FetchError(f"{_shown(url)}: set LABEL_STUDIO_URL so the bridge can fetch Label Studio files")
        if url.startswith("/"):
            # Joined as text, so a Label Studio served under a path prefix keeps it.
            return httpx.URL(f"{self._base}{url}")
        if scheme and "://" in url:
            if task_id is None:
                raise FetchError(f"{_shown(url)}: a cloud storage URL needs the task id to be presigned")
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            return httpx.URL(f"{self._base}/tasks/{task_id}/presign/", params={"fileuri": fileuri})
        raise FetchError(f"{_shown(url)}: not a URL the bridge can fetch (upload, local file, cloud or http(s))")

    def check_host(self, url: httpx.URL) -> None:
        """Refuse, without connecting, any host that is neither Label Studio's nor allowed."""
        host, host_port = _host_key(url)
        if host not in self._allowed and host_port not in self._allowed:
            allowed = ", ".join(sorted(self._allowed)) or "none"
            raise FetchError(
                f"image host {host_port!r} is not allowed (allowed: {allowed}); "
                "add it to LABELLOOP_ALLOWED_HOSTS to fetch from it"
            )

    async def fetch(self, url: str, task_id: int | None = None) -> bytes:
        """The bytes of one task image, or FetchError saying why not."""
        target = self.resolve(url, task_id)
        self.check_host(target)
        async with self._slots:
            try:
                return await asyncio.wait_for(self._download(target, url), self._timeout_s)
            except asyncio.TimeoutError as exc:
                raise FetchError(f"{_shown(url)}: not downloaded within {self._timeout_s:g}s") from exc

    async def _download(self, target: httpx.URL, shown: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            self.check_host(target)
            try:
                async with self._client.stream("GET", target) as response:
                    if response.is_redirect:
                        target = response.url.join(response.headers["location"])
                        continue
                    self._check_status(response, shown)
                    return await self._read_limited(response, shown)
            except httpx.HTTPError as exc:
                raise FetchError(f"{_shown(shown)}: {type(exc).__name__}: {exc}") from exc
        raise FetchError(f"{_shown(shown)}: more than {MAX_REDIRECTS} redirects")

    def _check_status(self, response: httpx.Response, shown: str) -> None:
        status = response.status_code
        if status < 400:
            return
        hint = ""
        if status in (401, 403) and self._base and response.url.host == httpx.URL(self._base).host:
            hint = (
                ": Label Studio refused the bridge's credentials; check LABEL_STUDIO_API_KEY "
                "(a legacy token must be enabled for the organization, or use a Personal Access Token)"
            )
        raise FetchError(f"{_shown(shown)}: HTTP {status}{hint}")

    async def _read_limited(self, response: httpx.Response, shown: str) -> bytes:
        """Read the body, aborting as soon as it is known to exceed ``max_image_bytes``."""
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
            raise FetchError(f"{_shown(shown)}: {int(declared)} bytes is over the {self._max_bytes}-byte limit")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self._max_bytes:
                raise FetchError(f"{_shown(shown)}: more than the {self._max_bytes}-byte limit")
            chunks.append(chunk)
        if size == 0:
            raise FetchError(f"{_shown(shown)}: empty response")
        return b"".join(chunks)
