"""`labelloop serve` as a user runs it: a foreground process with clear start-up errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


@pytest.fixture(scope="module")
def demo_backbone_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding only the demo backbone (template: copy before mutating)."""
    pytest.importorskip("transformers")
    from core.settings import Settings
    from trainer.backbone import publish_demo

    base = tmp_path_factory.mktemp("backbone-repo")
    settings = Settings(model_repository=base / "repo", state_dir=base / "state")  # type: ignore[call-arg]
    publish_demo(settings, "dinov3")
    return settings.model_repository


def _serve(repo: Path, state: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    """``labelloop serve`` in a subprocess, killed after 180 s so that a missing ready line fails, not hangs."""
    grpc = free_port()
    env = dict(os.environ, LABELLOOP_STATE_DIR=str(state))
    proc = subprocess.Popen(
        [sys.executable, "-m", "labelloop", *_serve_args(repo, grpc, free_port(), free_port()), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(180, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    _WATCHDOGS[proc.pid] = watchdog
    return proc, grpc


_WATCHDOGS: dict[int, threading.Timer] = {}


def _stop(proc: subprocess.Popen[str]) -> None:
    _WATCHDOGS.pop(proc.pid).cancel()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_loads_every_model_and_models_lists_their_kinds(
    model_repo: Path, demo_backbone_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    shutil.copytree(demo_backbone_repo / "dinov3", repo / "dinov3")
    proc, grpc = _serve(repo, tmp_path / "state")
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert first.startswith("ready: defect_detector v1 (dentado, concave, perforation"), first
        assert second.startswith("ready: dinov3 v1 (backbone; CPUExecutionProvider) on 127.0.0.1:"), second
        args = ["models", "--model-repository", str(repo), "--triton-url", f"127.0.0.1:{grpc}"]
        result = CliRunner().invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        rows = {row["name"]: row for row in json.loads(result.stdout)}
        assert {name: (row["kind"], row["version"], row["served"]) for name, row in rows.items()} == {
            "defect_detector": ("detector", 1, True),
            "dinov3": ("backbone", 1, True),
        }
        assert rows["dinov3"]["arch"] == "dinov3_demo" and rows["dinov3"]["note"] == "random-init demo backbone"
        lines = CliRunner().invoke(app, args).stdout.splitlines()
        assert lines[0].startswith("* defect_detector v1 detector fp32 imgsz ")
        assert lines[1] == "* dinov3 v1 backbone dinov3_demo patch 16 hidden 192 (random-init demo backbone)"
    finally:
        _stop(proc)
    assert proc.returncode == 0


def test_a_repository_holding_only_a_backbone_serves(demo_backbone_repo: Path, tmp_path: Path) -> None:
    proc, _ = _serve(demo_backbone_repo, tmp_path / "state")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready: dinov3 v1 (backbone; CPUExecutionProvider)"), line
    finally:
        _stop(proc)
    assert proc.returncode == 0
    # A model asked for by name must be there.
    proc, _ = _serve(demo_backbone_repo, tmp_path / "state2", "--model", "defect_detector")
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 1
    assert "model 'defect_detector' has no versions" in stderr
