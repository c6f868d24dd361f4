"""History is read before a run's decision and appended after it, so the Δ rule can fire."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import TrainingError
from trainer.evaluate import EvalResult
from trainer.history import HOLDOUT_SET, History
from trainer.pipeline import judge, training_lock
from trainer.rules import Rules


def _ev(map50: float) -> EvalResult:
    return EvalResult(map50=map50, map50_95=0.5, precision=0.5, recall=0.5, per_class_ap50={})


def _run(history: History, version: int, served: float, candidate: float | None = None) -> dict[str, object]:
    """What the pipeline does: judge from the history as it is, then append this run's record."""
    decision = judge(history, version, _ev(served), _ev(candidate) if candidate is not None else None, Rules())
    record = {
        "kind": "train",
        "set": HOLDOUT_SET,
        "served": {"version": version, "map50": served},
        "candidate": {"map50": candidate} if candidate is not None else None,
        "decision": decision.to_dict(),
        "published_version": version + 1 if decision.deploy else None,
    }
    history.append(record)
    return decision.to_dict()


def test_delta_rule_fires_because_history_is_appended_after_the_decision(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    first = _run(history, 1, 0.80)
    assert first["previous_served_map50"] is None and not first["retrain_needed"]
    second = _run(history, 1, 0.75)
    assert second["previous_served_map50"] == 0.80
    assert second["delta_map50"] == pytest.approx(-0.05)
    assert second["retrain_needed"] is True
    third = _run(history, 1, 0.74)
    assert third["previous_served_map50"] == 0.75 and third["retrain_needed"] is False

    records = list(history.records())
    assert [r["served"]["map50"] for r in records] == [0.80, 0.75, 0.74]
    assert records[1]["decision"]["previous_served_map50"] == 0.80, "the record holds the numbers it was decided on"
    assert all("time" in r for r in records)


def test_a_deployed_candidates_score_is_its_previous_evaluation(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    deployed = _run(history, 1, 0.70, candidate=0.90)
    assert deployed["deploy"] is True
    as_served = _run(history, 2, 0.85)
    assert as_served["previous_served_map50"] == 0.90
    assert as_served["retrain_needed"] is True


def test_other_sets_and_kinds_never_feed_the_delta(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    history.append(
        {"kind": "bootstrap", "set": "synthetic-held-out", "candidate": {"map50": 0.97}, "published_version": 1}
    )
    history.append({"kind": "rollback", "source_version": 1, "rolled_back_from": 2, "published_version": 3})
    assert history.previous_map50(1) is None
    assert history.previous_map50(3) is None


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    history.append({"kind": "train", "set": HOLDOUT_SET, "served": {"version": 1, "map50": 0.7}})
    with history.path.open("a") as fh:
        fh.write('{"kind": "train", "set": "hold')
    assert history.previous_map50(1) == 0.7
    assert len(list(history.records())) == 1
    history.append({"kind": "train", "set": HOLDOUT_SET, "served": {"version": 1, "map50": 0.6}})
    lines = history.path.read_text().splitlines()
    assert json.loads(lines[0])["served"]["map50"] == 0.7, "existing lines are never rewritten"


def test_one_training_run_at_a_time(tmp_path: Path) -> None:
    with training_lock(tmp_path):
        assert (tmp_path / "train.lock").read_text().strip().isdigit()
        with pytest.raises(TrainingError, match="another training run"):
            with training_lock(tmp_path):
                pass
    with training_lock(tmp_path):
        pass
