"""The bridge's basic-auth credentials: configured, or generated once and kept owner-only.

Auth is on by default. When ``basic_auth_user``/``basic_auth_pass`` are not set, the bridge and
``labelloop up`` share one generated pair stored in ``<state_dir>/bridge-auth.json`` (mode 0600),
so Label Studio is connected with the same credentials the bridge checks.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from core.errors import ConfigError
from core.files import write_json_atomic
from core.settings import Settings

__all__ = ["BasicCredentials", "bridge_credentials", "credentials_path"]

GENERATED_USER = "labelloop"


@dataclass(frozen=True)
class BasicCredentials:
    """A user and password; the password never shows in a repr or a log line."""

    user: str
    password: SecretStr

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value for HTTP basic auth."""
        pair = f"{self.user}:{self.password.get_secret_value()}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def credentials_path(settings: Settings) -> Path:
    return settings.state_dir / "bridge-auth.json"


def bridge_credentials(settings: Settings, *, create: bool = True) -> BasicCredentials | None:
    """The configured pair; else the stored one; else (``create``) a new pair, stored owner-only."""
    user = settings.basic_auth_user
    password = settings.basic_auth_pass
    if user or password:
        if not user or password is None or not password.get_secret_value():
            raise ConfigError("basic auth needs both BASIC_AUTH_USER and BASIC_AUTH_PASS (only one is set)")
        return BasicCredentials(user, password)
    path = credentials_path(settings)
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            return BasicCredentials(str(stored["user"]), SecretStr(str(stored["password"])))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is unreadable ({type(exc).__name__}); delete it to generate new ones") from exc
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    new = BasicCredentials(GENERATED_USER, SecretStr(secrets.token_urlsafe(24)))
    write_json_atomic(path, {"user": new.user, "password": new.password.get_secret_value()}, mode=0o600)
    return new
