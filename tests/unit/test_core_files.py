"""Atomic writes and the bridge's generated credentials."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from core.credentials import bridge_credentials, credentials_path
from core.errors import ConfigError
from core.files import write_atomic
from core.settings import Settings


def test_an_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "card.json"
    target.write_text("old")
    write_atomic(target, "new", mode=0o600)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "card.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_atomic(target, 42)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]


def test_generated_credentials_are_stored_owner_only_and_reused(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    assert bridge_credentials(settings, create=False) is None
    first = bridge_credentials(settings)
    assert first is not None and len(first.password.get_secret_value()) >= 24
    assert stat.S_IMODE(credentials_path(settings).stat().st_mode) == 0o600
    assert bridge_credentials(settings) == first
    assert first.password.get_secret_value() not in repr(first)


def test_configured_credentials_win_and_half_a_pair_is_an_error(tmp_path: Path) -> None:
    given = bridge_credentials(Settings(state_dir=tmp_path, basic_auth_user="u", basic_auth_pass="p"))
    assert given is not None and (given.user, given.password.get_secret_value()) == ("u", "p")
    assert not credentials_path(Settings(state_dir=tmp_path)).exists()
    with pytest.raises(ConfigError, match="both"):
        bridge_credentials(Settings(state_dir=tmp_path, basic_auth_user="u"))
