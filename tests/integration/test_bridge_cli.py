"""``labelloop bridge`` and ``labelloop prelabel`` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from core.credentials import credentials_path
from core.settings import Settings
from labelloop.cli import app
from tests.conftest import TritonHandle, free_port


@pytest.mark.slow
@pytest.mark.triton
def test_bridge_serves_on_loopback_until_sigterm(triton_server: TritonHandle, tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, LABELLOOP_STATE_DIR=str(tmp_path / "state"))
    command = [sys.executable, "-m", "labelloop", "bridge", "--port", str(port), "--triton-url", triton_server.url]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    stored = credentials_path(Settings(state_dir=tmp_path / "state"))
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0, trust_env=False)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None and health.status_code == 401  # auth is on by default
        pair = json.loads(stored.read_text())
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        auth = (pair["user"], pair["password"])
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0, trust_env=False, auth=auth)
        assert health.json()["model_version"] == "defect_detector@v1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stdout is not None
    output = proc.stdout.read()
    assert "bridge ready: defect_detector@v1" in output
    assert f"basic auth on: user and password in {stored}" in output
    assert pair["password"] not in output
    assert f"Uvicorn running on http://127.0.0.1:{port}" in output


def test_bridge_refuses_half_configured_basic_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASIC_AUTH_USER", "labelstudio")
    result = CliRunner().invoke(app, ["bridge", "--port", str(free_port())])
    assert result.exit_code == 1
    assert "error: basic auth needs both BASIC_AUTH_USER and BASIC_AUTH_PASS" in result.stderr


def test_bridge_refuses_a_taken_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["bridge", "--port", str(port)])
    assert result.exit_code == 1
    assert f"error: bridge port 127.0.0.1:{port} is already in use" in result.stderr


def test_prelabel_needs_label_studio(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["prelabel", "--project", "1"], env={"LABELLOOP_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert "error: prelabel needs Label Studio's address and key: export LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in (
        result.stderr
    )
