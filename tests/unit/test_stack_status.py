"""`labelloop status` reads the trainer's history: the last run, its decision and why, with nothing running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labelloop.cli import app
from tests.conftest import free_port
from trainer.evaluate import EvalResult
from trainer.history import History
from trainer.rules import Rules, decide


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "LABELLOOP_STATE_DIR": str(tmp_path / "state"),
        "LABELLOOP_TRITON_URL": f"127.0.0.1:{free_port()}",
        "LABELLOOP_BRIDGE_PORT": str(free_port()),
    }


def _record(tmp_path: Path, served: float, candidate: float, published: int | None) -> dict[str, object]:
    """A history line as the pipeline appends it after a run."""
    served_eval, candidate_eval = EvalResult(served, 0.3, 0.7, 0.6), EvalResult(candidate, 0.35, 0.8, 0.6)
    decision = decide(candidate_eval, served_eval, None, Rules())
    record: dict[str, object] = {
        "kind": "train",
        "set": "holdout",
        "run_id": "20260101T120000",
        "served": {"version": 1, **served_eval.to_dict()},
        "candidate": candidate_eval.to_dict(),
        "decision": decision.to_dict(),
        "published_version": published if decision.deploy else None,
        "error": None,
    }
    History(tmp_path / "state" / "trainer" / "history.jsonl").append(record)
    return record


def test_status_without_runs_says_so(env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["status", "--json"], env=env)
    assert result.exit_code == 0, result.output
    state = json.loads(result.stdout)
    assert state["trainer"] == {
        "watching": False,
        "bootstrapping": False,
        "train_every_annotations": 50,
        "last_run": None,
    }
    assert state["bridge"]["status"] == "DOWN" and state["bridge"]["auth"] == "basic"
    text = CliRunner().invoke(app, ["status"], env=env).stdout
    assert "trainer       not watching" in text and "last run      none yet" in text


def test_status_shows_the_newest_run_and_its_decision(env: dict[str, str], tmp_path: Path) -> None:
    _record(tmp_path, served=0.50, candidate=0.51, published=None)  # older: must not be shown
    record = _record(tmp_path, served=0.50, candidate=0.80, published=2)
    decision = record["decision"]
    assert isinstance(decision, dict) and decision["deploy"] is True

    state = json.loads(CliRunner().invoke(app, ["status", "--json"], env=env).stdout)
    run = state["trainer"]["last_run"]
    assert run["run_id"] == "20260101T120000" and run["kind"] == "train"
    assert (run["served_version"], run["served_map50"], run["candidate_map50"]) == (1, 0.50, 0.80)
    assert (run["deploy"], run["published_version"], run["error"]) == (True, 2, None)
    assert run["reasons"] == decision["reasons"] and run["time"]

    text = CliRunner().invoke(app, ["status"], env=env).stdout
    last = text.split("last run", 1)[1]
    assert "train 20260101T120000: deployed: published v2" in last
    assert "served v1 mAP50 0.5000, candidate mAP50 0.8000" in last
    assert all(f"  - {reason}" in last for reason in decision["reasons"])


def test_status_shows_a_run_that_kept_the_served_version(env: dict[str, str], tmp_path: Path) -> None:
    record = _record(tmp_path, served=0.90, candidate=0.89, published=None)
    decision = record["decision"]
    assert isinstance(decision, dict) and decision["deploy"] is False
    text = CliRunner().invoke(app, ["status"], env=env).stdout
    assert "not deployed: v1 stays served" in text.split("last run", 1)[1]
