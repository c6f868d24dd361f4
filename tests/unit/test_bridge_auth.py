"""Legacy tokens go out as ``Token``; a PAT is refreshed into ``Bearer`` access, again on 401 or expiry.

The transport here only injects faults (an expired access token, a refused refresh); the real
exchange with Label Studio is proven end to end in tests/integration/test_bridge_label_studio.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

import httpx
import pytest

from core.errors import LabelStudioError
from core.studio_auth import LabelStudioAuth, token_kind

LS = "http://ls.test:8080"
LEGACY = "0123456789abcdef0123456789abcdef01234567"


def _jwt(**claims: object) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(dict(claims))}.c2lnbmF0dXJl"


PAT = _jwt(token_type="refresh", exp=time.time() + 86400, jti="pat")


class FakeStudio:
    """Answers like Label Studio, with knobs for the faults under test."""

    def __init__(self, access_ttl_s: float = 300.0, refresh_status: int = 200) -> None:
        self.access_ttl_s = access_ttl_s
        self.refresh_status = refresh_status
        self.issued: list[str] = []
        self.expired: set[str] = set()
        self.seen: list[tuple[str, str, str | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization")
        is_refresh = request.url.path == "/api/token/refresh/"
        self.seen.append((request.method, "refresh" if is_refresh else str(request.url), auth))
        if is_refresh:
            if self.refresh_status != 200 or json.loads(request.content) != {"refresh": PAT}:
                return httpx.Response(self.refresh_status, json={"detail": "Token is invalid"})
            access = _jwt(token_type="access", exp=time.time() + self.access_ttl_s, n=len(self.issued))
            self.issued.append(access)
            return httpx.Response(200, json={"access": access})
        if request.url.host != "ls.test":
            return httpx.Response(200, content=b"elsewhere")
        valid = {f"Token {LEGACY}"} | {f"Bearer {a}" for a in self.issued if a not in self.expired}
        return httpx.Response(200 if auth in valid else 401, content=b"image")


def _client(studio: FakeStudio, token: str) -> tuple[httpx.AsyncClient, LabelStudioAuth]:
    auth = LabelStudioAuth(LS, token)
    return httpx.AsyncClient(transport=httpx.MockTransport(studio), auth=auth), auth


def test_token_kinds() -> None:
    assert token_kind(LEGACY) == "legacy"
    assert token_kind(PAT) == "pat"
    assert token_kind(_jwt(token_type="access")) == "legacy"
    assert token_kind("a.b.c") == "legacy"


def test_legacy_token_goes_to_label_studio_only() -> None:
    async def run() -> FakeStudio:
        studio = FakeStudio()
        client, _ = _client(studio, LEGACY)
        async with client:
            assert (await client.get(f"{LS}/data/upload/1/a.png")).status_code == 200
            assert (await client.get("http://images.test/a.png")).status_code == 200
        return studio

    studio = asyncio.run(run())
    assert [auth for _, _, auth in studio.seen] == [f"Token {LEGACY}", None]


def test_pat_is_refreshed_into_bearer_and_again_after_a_401(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> tuple[FakeStudio, LabelStudioAuth]:
        studio = FakeStudio()
        client, auth = _client(studio, PAT)
        async with client:
            assert (await client.get(f"{LS}/data/upload/1/a.png")).status_code == 200
            studio.expired.add(studio.issued[-1])  # Label Studio forgets the access token early
            assert (await client.get(f"{LS}/data/upload/1/b.png")).status_code == 200
            assert (await client.get("http://images.test/c.png")).status_code == 200
        return studio, auth

    with caplog.at_level(logging.DEBUG):
        studio, auth = asyncio.run(run())
    first, second = studio.issued
    assert studio.seen == [
        ("POST", "refresh", None),
        ("GET", f"{LS}/data/upload/1/a.png", f"Bearer {first}"),
        ("GET", f"{LS}/data/upload/1/b.png", f"Bearer {first}"),
        ("POST", "refresh", None),
        ("GET", f"{LS}/data/upload/1/b.png", f"Bearer {second}"),
        ("GET", "http://images.test/c.png", None),
    ]
    assert auth.refreshes == 2
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "refreshed the Label Studio access token" in logged
    for secret in (PAT, first, second):
        assert secret not in logged
        assert secret not in repr(auth)


def test_access_token_close_to_expiry_is_refreshed_before_use() -> None:
    async def run() -> FakeStudio:
        studio = FakeStudio(access_ttl_s=5.0)  # inside the 30 s margin: stale at once
        client, _ = _client(studio, PAT)
        async with client:
            for name in ("a", "b"):
                assert (await client.get(f"{LS}/data/upload/1/{name}.png")).status_code == 200
        return studio

    studio = asyncio.run(run())
    assert [m for m, _, _ in studio.seen] == ["POST", "GET", "POST", "GET"]


def test_concurrent_requests_share_one_refresh() -> None:
    async def run() -> FakeStudio:
        studio = FakeStudio()
        client, _ = _client(studio, PAT)
        async with client:
            answers = await asyncio.gather(*(client.get(f"{LS}/data/upload/1/{i}.png") for i in range(10)))
        assert {a.status_code for a in answers} == {200}
        return studio

    assert len(asyncio.run(run()).issued) == 1


def test_refused_refresh_is_a_label_studio_error_without_the_token() -> None:
    async def run() -> None:
        client, _ = _client(FakeStudio(refresh_status=401), PAT)
        async with client:
            await client.get(f"{LS}/data/upload/1/a.png")

    with pytest.raises(LabelStudioError, match="invalid, expired or revoked") as info:
        asyncio.run(run())
    assert PAT not in str(info.value)
