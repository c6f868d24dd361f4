"""Credentials for Label Studio's API and media: legacy tokens and Personal Access Tokens.

A legacy token (40 hex characters) goes out as ``Authorization: Token <key>``. A Personal Access
Token is a JWT *refresh* token: it is exchanged at ``POST /api/token/refresh/`` for a short-lived
access token (5 minutes by default) sent as ``Bearer <access>``, and exchanged again shortly before
that expires or when Label Studio answers 401. Credentials go only to Label Studio's own origin,
never to other hosts (presigned cloud URLs, allowed image hosts). Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import AsyncGenerator, Generator
from typing import Any, Literal

import httpx

from core.errors import LabelStudioError

__all__ = ["LabelStudioAuth", "token_kind"]

logger = logging.getLogger(__name__)

REFRESH_PATH = "/api/token/refresh/"
# Refresh this long before the access token's own ``exp``, so a request never races its expiry.
_EXPIRY_MARGIN_S = 30.0

TokenKind = Literal["legacy", "pat"]


def _jwt_claims(token: str) -> dict[str, Any] | None:
    """The (unverified) payload of a JWT, or None when ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def token_kind(token: str) -> TokenKind:
    """A JWT refresh token is a Personal Access Token; anything else is sent as a legacy token."""
    claims = _jwt_claims(token)
    return "pat" if claims is not None and claims.get("token_type") == "refresh" else "legacy"


class LabelStudioAuth(httpx.Auth):
    """httpx auth for Label Studio: ``Token`` for legacy keys, refreshed ``Bearer`` for PATs."""

    def __init__(self, base_url: str, token: str) -> None:
        self._origin = httpx.URL(base_url)
        self._refresh_url = self._origin.join(REFRESH_PATH)
        self._token = token
        self.kind: TokenKind = token_kind(token)
        self._access: str | None = None
        self._access_expires = 0.0
        self.refreshes = 0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"LabelStudioAuth({str(self._origin)!r}, kind={self.kind!r})"

    def _same_origin(self, url: httpx.URL) -> bool:
        origin = self._origin
        return (url.scheme, url.host, url.port) == (origin.scheme, origin.host, origin.port)

    def _stale(self) -> bool:
        return self._access is None or time.time() >= self._access_expires - _EXPIRY_MARGIN_S

    def _refresh_request(self) -> httpx.Request:
        return httpx.Request("POST", self._refresh_url, json={"refresh": self._token})

    async def _store(self, response: httpx.Response) -> None:
        """Keep the access token from a refresh answer, or say why there is none."""
        await response.aread()
        if response.status_code != 200:
            hint = " (the Personal Access Token is invalid, expired or revoked)" if response.status_code == 401 else ""
            raise LabelStudioError(
                f"Label Studio refused to refresh the Personal Access Token: HTTP {response.status_code}{hint}"
            )
        try:
            access = str(response.json()["access"])
        except (ValueError, KeyError, TypeError) as exc:
            raise LabelStudioError("Label Studio's token refresh answer holds no access token") from exc
        claims = _jwt_claims(access) or {}
        self._access = access
        self._access_expires = float(claims.get("exp", time.time() + 60.0))
        self.refreshes += 1
        logger.info("refreshed the Label Studio access token (valid %.0fs more)", self._access_expires - time.time())

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("LabelStudioAuth refreshes tokens asynchronously: use it with httpx.AsyncClient")

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if not self._same_origin(request.url):
            yield request
            return
        if self.kind == "legacy":
            request.headers["Authorization"] = f"Token {self._token}"
            yield request
            return
        if self._stale():
            async with self._lock:
                if self._stale():  # another request may have refreshed while this one waited
                    await self._store((yield self._refresh_request()))
        used = self._access
        request.headers["Authorization"] = f"Bearer {used}"
        response = yield request
        if response.status_code != 401:
            return
        async with self._lock:
            if self._access == used:
                await self._store((yield self._refresh_request()))
        request.headers["Authorization"] = f"Bearer {self._access}"
        yield request
