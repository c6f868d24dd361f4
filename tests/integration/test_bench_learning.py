"""``labelloop bench learning`` end to end at CI size (``--quick``): real trainers, synthetic data.

Structure and sanity only: at CI size the curves are too short and noisy to assert that uncertainty
beats random; the measured numbers at the full settings are in the README.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from labelloop.cli import app

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STRATEGIES = ["random", "uncertainty", "diverse"]


def _run(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "state"))
    out_json, out_png = tmp_path / f"{kind}.json", tmp_path / f"{kind}.png"
    args = ["bench", "learning", "--kind", kind, "--quick", "--json", str(out_json), "--png", str(out_png)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "labels_to_target" in result.output
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    report: dict[str, Any] = json.loads(out_json.read_text())
    return report


def _check_report(report: dict[str, Any], kind: str, metric: str) -> None:
    settings = report["settings"]
    assert report["kind"] == kind and report["metric"] == metric
    assert settings["quick"] is True and settings["strategies"] == STRATEGIES
    for field in ("rounds", "batch", "seeds", "initial", "pool", "held_out"):
        assert isinstance(settings[field], int) and settings[field] > 0, field
    counts = report["label_counts"]
    assert counts == [settings["initial"] + r * settings["batch"] for r in range(settings["rounds"] + 1)]
    assert list(report["curves"]) == STRATEGIES
    for strategy, points in report["curves"].items():
        assert [p["labels"] for p in points] == counts, strategy
        for p in points:
            assert 0.0 <= p["mean"] <= 1.0 and p["std"] >= 0.0 and len(p["values"]) == settings["seeds"]
        # Every strategy starts from the same seed set and the same first model.
        assert points[0]["mean"] == report["curves"]["random"][0]["mean"]
    assert isinstance(report["target"], float) and report["target_rule"]
    assert set(report["labels_to_target"]) == set(STRATEGIES)
    for reached in report["labels_to_target"].values():
        assert reached is None or reached in counts
    ltt = report["labels_to_target"]
    saving = report["label_saving"]
    if ltt["random"] is None or ltt["uncertainty"] is None:
        assert saving is None
    else:
        assert math.isclose(saving, 1 - ltt["uncertainty"] / ltt["random"], abs_tol=1e-4)
    assert set(report["label_saving_by_strategy"]) == {"uncertainty", "diverse"}
    assert report["seconds"] > 0 and report["seconds_by_stage"]["train_s"] > 0
    assert report["machine"]["cpus"] >= 1


def test_bench_learning_classifier_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = _run("classifier", tmp_path, monkeypatch)
    _check_report(report, "classifier", "macro_f1")
    # The head learns something from 12 labels of 6 classes (chance is about 1/6).
    assert report["curves"]["random"][-1]["mean"] > 0.2


def test_bench_learning_detector_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = _run("detector", tmp_path, monkeypatch)
    _check_report(report, "detector", "map50")


def test_bench_learning_rejects_unknown_strategy_and_kind() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "learning", "--kind", "classifier", "--strategy", "random,entropy"])
    assert result.exit_code != 0 and "entropy" in result.output
    result = runner.invoke(app, ["bench", "learning", "--kind", "segmenter"])
    assert result.exit_code != 0 and "segmenter" in result.output
