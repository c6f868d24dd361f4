"""`labelloop serve` as a user runs it: a foreground process with clear start-up errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from core.errors import ConfigError
from labelloop.cli import app
from serving import launcher
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.triton]


def _serve_args(repo: Path, grpc: int, http: int, metrics: int) -> list[str]:
    return [
        "serve",
        "--model-repository",
        str(repo),
        "--grpc-port",
        str(grpc),
        "--http-port",
        str(http),
        "--metrics-port",
        str(metrics),
    ]


def test_serve_runs_until_sigterm_and_logs_to_a_file(model_repo: Path, tmp_path: Path) -> None:
    grpc, http, metrics = free_port(), free_port(), free_port()
    env = dict(os.environ, LABELLOOP_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "labelloop", *_serve_args(model_repo, grpc, http, metrics)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready: defect_detector v1 (dentado, concave, perforation"), line
        # gRPC and metrics on loopback only; the HTTP endpoint stays closed unless --http asks for it.
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", grpc)) == 0
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", http)) != 0
        assert "nv_inference_count" in httpx.get(f"http://127.0.0.1:{metrics}/metrics", trust_env=False).text
        listening = {
            (conn.laddr.ip, conn.laddr.port)
            for child in psutil.Process(proc.pid).children(recursive=True)
            for conn in child.net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN
        }
        assert {port for _, port in listening} == {grpc, metrics}
        assert {ip.removeprefix("::ffff:") for ip, _ in listening} == {"127.0.0.1"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "state" / "logs" / "triton.log").stat().st_size > 0
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", grpc)) != 0


def test_serve_refuses_a_taken_port(model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "state"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, _serve_args(model_repo, port, free_port(), free_port()))
    assert result.exit_code == 1
    assert f"grpc port 127.0.0.1:{port} is already in use" in result.stderr


def test_serve_refuses_an_empty_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, _serve_args(tmp_path / "empty", free_port(), free_port(), free_port()))
    assert result.exit_code == 1
    assert "has no models" in result.stderr and "labelloop bootstrap" in result.stderr


def test_serve_reports_a_version_that_fails_to_load(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "defect_detector" / "1").mkdir(parents=True)
    config = (model_repo / "defect_detector" / "config.pbtxt").read_text()
    (repo / "defect_detector" / "config.pbtxt").write_text(config)
    (repo / "defect_detector" / "1" / "model.py").write_text("raise RuntimeError('broken on purpose')\n")
    result = CliRunner().invoke(
        app, _serve_args(repo, free_port(), free_port(), free_port()), env={"LABELLOOP_STATE_DIR": str(tmp_path / "s")}
    )
    assert result.exit_code == 1
    assert "no version of 'defect_detector' loads: v1:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_binary_or_stub_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert launcher.find_triton().binary.is_file()
    monkeypatch.setattr(sys, "version_info", SimpleNamespace(major=3, minor=99))
    with pytest.raises(ConfigError, match="no python backend stub for Python 3.99"):
        launcher.find_triton()
    monkeypatch.undo()
    fake = SimpleNamespace(submodule_search_locations=[str(tmp_path / "pytriton")])
    monkeypatch.setattr(launcher, "find_spec", lambda name: fake)
    with pytest.raises(ConfigError, match="tritonserver binary missing"):
        launcher.find_triton()
    with pytest.raises(ConfigError, match="does not exist"):
        launcher.TritonProcess(tmp_path / "nope", tmp_path).start()
