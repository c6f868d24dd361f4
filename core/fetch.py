"""Download task images: Label Studio uploads, local files, cloud storage and plain http(s).

Where a task URL points, and how it is fetched:

    /data/upload/<project>/<file>     Label Studio, with its credentials
    /data/local-files/?d=<path>       Label Studio (LOCAL_FILES_SERVING_ENABLED), with its credentials
    s3://, gs://, azure-blob://, ...  Label Studio's ``/tasks/<id>/presign/?fileuri=<base64>``, which
                                      proxies the file or redirects to a presigned URL
    http(s)://host[:port]/...         directly
    file:///path                      read from disk, only under ``local_file_roots``

Only exact origins (scheme, host and port, default ports made explicit) are ever contacted: Label
Studio's own and ``allowed_origins``. Any other origin, the Label Studio host on another port
included, and every redirect hop that leaves them, is refused before a connection is made. A file
is read only when its path, symlinks resolved, lies under a configured root. Downloads are bounded
in number (``fetch_concurrency``), size (``max_image_bytes``, checked while streaming) and time
(``fetch_timeout_s`` per image, redirects included, and whatever is left of the caller's deadline).
Every failure, a malformed URL included, is a ``FetchError``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from core.errors import FetchError
from core.settings import Settings
from core.studio_auth import LabelStudioAuth
from core.transport import AiohttpTransport

__all__ = ["ImageFetcher", "origin_of"]

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_DIRECT_SCHEMES = frozenset({"http", "https"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SHOWN_URL_CHARS = 200

Origin = tuple[str, str, int]


def _make_auth(settings: Settings) -> LabelStudioAuth | None:
    """Credentials for Label Studio when both its URL and a key are configured."""
    if not settings.label_studio_url or settings.label_studio_api_key is None:
        return None
    return LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key.get_secret_value())


def _shown(url: str) -> str:
    return url if len(url) <= _SHOWN_URL_CHARS else url[: _SHOWN_URL_CHARS - 3] + "..."


def origin_of(url: httpx.URL) -> Origin:
    """(scheme, ASCII host, port) with the scheme's default port made explicit."""
    scheme = url.scheme.lower()
    return scheme, url.raw_host.decode("ascii").lower(), url.port or _DEFAULT_PORTS.get(scheme, 0)


def _origin_text(origin: Origin) -> str:
    scheme, host, port = origin
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


@contextmanager
def _malformed_is_fetch_error(url: str) -> Iterator[None]:
    """A URL that httpx, yarl or the codecs cannot handle fails its task alone, as a FetchError."""
    try:
        yield
    except (ValueError, httpx.InvalidURL) as exc:  # UnicodeError is a ValueError
        raise FetchError(f"{_shown(url)!r}: malformed URL ({type(exc).__name__}: {exc})") from exc


class ImageFetcher:
    """Fetches task images; create it inside the event loop that uses it, and ``aclose`` it."""

    def __init__(self, settings: Settings, auth: LabelStudioAuth | None = None) -> None:
        self._base = settings.label_studio_url.rstrip("/") if settings.label_studio_url else None
        allowed = {origin_of(httpx.URL(entry)) for entry in settings.allowed_origins}
        if self._base:
            allowed.add(origin_of(httpx.URL(self._base)))
        self._allowed = frozenset(allowed)
        self._roots = tuple(root.expanduser().resolve() for root in settings.local_file_roots)
        self._max_bytes = settings.max_image_bytes
        self._timeout_s = settings.fetch_timeout_s
        self._slots = asyncio.Semaphore(settings.fetch_concurrency)
        self.auth = auth if auth is not None else _make_auth(settings)
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
    def allowed_origins(self) -> list[str]:
        return sorted(_origin_text(origin) for origin in self._allowed)

    def resolve(self, url: str, task_id: int | None = None) -> httpx.URL:
        """The URL to download for a task's image value (no I/O)."""
        with _malformed_is_fetch_error(url):
            return self._resolve(url.strip(), task_id)

    def _resolve(self, url: str, task_id: int | None) -> httpx.URL:
        if not url:
            raise FetchError("the task has no image URL")
        scheme = urlsplit(url).scheme.lower()
        if scheme in _DIRECT_SCHEMES:
            return httpx.URL(url)
        if scheme == "file":
            raise FetchError(f"{_shown(url)}: a file URL is read from disk, not downloaded")
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

    def check_origin(self, url: httpx.URL) -> None:
        """Refuse, without connecting, any origin that is neither Label Studio's nor allowed."""
        origin = origin_of(url)
        if origin not in self._allowed:
            allowed = ", ".join(self.allowed_origins) or "none"
            raise FetchError(
                f"image origin {_origin_text(origin)!r} is not allowed (allowed: {allowed}); "
                "add it to allowed_origins (LABELLOOP_ALLOWED_ORIGINS) to fetch from it"
            )

    def local_path(self, url: str) -> Path:
        """The file a ``file://`` URL names, symlinks resolved, if it lies under ``local_file_roots``."""
        with _malformed_is_fetch_error(url):
            parts = urlsplit(url.strip())
            if parts.netloc not in ("", "localhost"):
                raise FetchError(f"{_shown(url)}: a file URL must name a local path (file:///path)")
            if not self._roots:
                raise FetchError(f"{_shown(url)}: file URLs are read only under local_file_roots, and none is set")
            try:
                path = Path(unquote(parts.path)).resolve(strict=True)
            except OSError as exc:
                raise FetchError(f"{_shown(url)}: {type(exc).__name__}: {exc.strerror}") from exc
        if not any(path.is_relative_to(root) for root in self._roots):
            roots = ", ".join(map(str, self._roots))
            raise FetchError(f"{_shown(url)}: {path} is outside local_file_roots ({roots})")
        return path

    async def fetch(self, url: str, task_id: int | None = None, deadline: float | None = None) -> bytes:
        """The bytes of one task image, or FetchError saying why not.

        ``deadline`` (``time.monotonic()``) caps the download further than ``fetch_timeout_s``.
        """
        with _malformed_is_fetch_error(url):
            if urlsplit(url.strip()).scheme.lower() == "file":
                path = self.local_path(url)
                async with self._slots:
                    return await asyncio.to_thread(self._read_file, path, url)
            target = self.resolve(url, task_id)
            self.check_origin(target)
            async with self._slots:
                timeout_s = self._timeout_s if deadline is None else min(self._timeout_s, deadline - time.monotonic())
                if timeout_s <= 0:
                    raise FetchError(f"{_shown(url)}: the request's time budget was spent before the download")
                try:
                    return await asyncio.wait_for(self._download(target, url), timeout_s)
                except asyncio.TimeoutError as exc:
                    raise FetchError(f"{_shown(url)}: not downloaded within {timeout_s:.3g}s") from exc

    def _read_file(self, path: Path, shown: str) -> bytes:
        """Read a regular file of at most ``max_image_bytes`` (a device or FIFO would never end)."""
        try:
            # O_NONBLOCK: opening a FIFO would otherwise wait for a writer before the check below.
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise FetchError(f"{_shown(shown)}: {path} is not a regular file")
                if info.st_size > self._max_bytes:
                    raise FetchError(f"{_shown(shown)}: {info.st_size} bytes is over the {self._max_bytes}-byte limit")
                data = handle.read(self._max_bytes + 1)
        except OSError as exc:
            raise FetchError(f"{_shown(shown)}: {type(exc).__name__}: {exc.strerror}") from exc
        if len(data) > self._max_bytes:
            raise FetchError(f"{_shown(shown)}: more than the {self._max_bytes}-byte limit")
        if not data:
            raise FetchError(f"{_shown(shown)}: empty file")
        return data

    async def _download(self, target: httpx.URL, shown: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            self.check_origin(target)
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
        if status in (401, 403) and self._base and origin_of(response.url) == origin_of(httpx.URL(self._base)):
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
