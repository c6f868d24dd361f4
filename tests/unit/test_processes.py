"""Daemon records: a process is ours while its start time and arguments match the record."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest

from core.processes import Daemon


@pytest.fixture
def sleeper(tmp_path: Path) -> Daemon:
    daemon = Daemon(tmp_path, "sleeper")
    daemon.start([sys.executable, "-c", "import time; time.sleep(60)"], env={}, cwd=tmp_path)
    return daemon


def test_a_started_daemon_runs_and_stops(sleeper: Daemon) -> None:
    assert sleeper.running()
    sleeper.stop()
    assert not sleeper.running()


def test_a_process_still_loading_its_program_counts_as_ours(sleeper: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """During exec /proc shows no arguments for a moment (seen: `up` declared a healthy bridge dead)."""
    monkeypatch.setattr(psutil.Process, "cmdline", lambda self: [])
    assert sleeper.running()
    monkeypatch.setattr(psutil.Process, "cmdline", lambda self: [sys.executable, "-c", "something else"])
    assert not sleeper.running(), "another program under the same pid is not ours"
    monkeypatch.undo()
    sleeper.stop()
