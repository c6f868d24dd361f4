"""`up` waiting for the default model: it shows each epoch, and a bootstrap that dies fails `up` with its log."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from core.errors import LabelloopError
from core.processes import Daemon
from core.settings import Settings
from labelloop.stack import BOOTSTRAP, wait_for_first_version


def test_a_bootstrap_that_dies_fails_up_with_its_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(model_repository=tmp_path / "repo", state_dir=tmp_path / "state")  # type: ignore[call-arg]
    progress = tmp_path / "state" / "trainer" / "bootstrap" / "progress.json"
    # A stand-in that reports one epoch the way the bootstrap does, then fails as training can.
    script = textwrap.dedent(
        f"""
        import json, pathlib, sys, time
        path = pathlib.Path({str(progress)!r})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({{"epoch": 1, "epochs": 15, "val_map50": 0.0}}))
        time.sleep(1.5)
        print("TrainingError: training failed: out of memory", flush=True)
        sys.exit(3)
        """
    )
    daemon = Daemon(settings.state_dir, BOOTSTRAP)
    daemon.start([sys.executable, "-c", script], env={}, cwd=tmp_path)
    with pytest.raises(LabelloopError, match="the default model's training exited.*out of memory"):
        wait_for_first_version(settings, daemon)
    assert "epoch 1/15, validation mAP50 0.0000" in capsys.readouterr().out
    assert not daemon.running()
