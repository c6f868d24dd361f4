"""The history the ΔmAP50 rule reads: written by ``History.append_run``, read by ``previous_map50`` and ``judge``.

The order inside a run (decide, then append) is the pipeline's; tests/integration/test_trainer.py
checks it on real runs (``--if-needed`` twice: the second sees the first's score).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from core.errors import TrainingError
from trainer.evaluate import EvalResult
from trainer.history import HOLDOUT_SET, History
from trainer.pipeline import judge, training_lock
from trainer.rules import Decision, Rules

RULES = Rules()


def _ev(map50: float) -> EvalResult:
    return EvalResult(map50=map50, map50_95=0.5, precision=0.5, recall=0.5, per_class_ap50={})


def _judge_and_append(
    history: History, version: int, served: float, candidate: float | None = None, published: int | None = None
) -> Decision:
    """One evaluated run: judged on the history as it stands, then recorded through the public writer."""
    cand = _ev(candidate) if candidate is not None else None
    decision = judge(history, version, _ev(served), cand, RULES)
    history.append_run(
        "train" if cand is not None else "evaluate",
        served_version=version,
        served={"map50": served},
        candidate=None if candidate is None else {"map50": candidate},
        decision=decision,
        published_version=published if decision.deploy else None,
        run_id=f"run-{len(list(history.records()))}",
    )
    return decision


def test_no_history_no_delta(tmp_path: Path) -> None:
    history = History(tmp_path / "missing" / "history.jsonl")
    assert list(history.records()) == []
    assert history.previous_map50(1) is None
    decision = judge(history, 1, _ev(0.80), None, RULES)
    assert decision.previous_served_map50 is None and decision.delta_map50 is None
    assert decision.retrain_needed is False
    assert judge(history, None, None, _ev(0.5), RULES).deploy, "nothing served: the first candidate is deployed"


def test_the_delta_rule_fires_on_the_previous_evaluation(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    assert _judge_and_append(history, 1, 0.80).retrain_needed is False
    second = _judge_and_append(history, 1, 0.75)
    assert (second.previous_served_map50, second.delta_map50, second.retrain_needed) == (0.80, -0.05, True)
    third = _judge_and_append(history, 1, 0.74)
    assert (third.previous_served_map50, third.retrain_needed) == (0.75, False), "the latest evaluation counts"

    records = list(history.records())
    assert [(r["kind"], r["set"], r["served"]) for r in records] == [
        ("evaluate", HOLDOUT_SET, {"version": 1, "map50": m}) for m in (0.80, 0.75, 0.74)
    ]
    assert records[1]["decision"]["previous_served_map50"] == 0.80, "a record holds the numbers it was decided on"
    assert records[1]["decision"]["retrain_needed"] is True
    assert all("time" in r and r["run_id"].startswith("run-") for r in records)


@pytest.mark.parametrize(("now", "retrain"), [(0.77, False), (0.7699, True)])
def test_a_drop_of_exactly_003_read_back_from_the_file_does_not_retrain(
    tmp_path: Path, now: float, retrain: bool
) -> None:
    """JSON keeps the float as written, so the boundary survives the round trip through the file."""
    history = History(tmp_path / "history.jsonl")
    _judge_and_append(history, 1, 0.80)
    decision = _judge_and_append(history, 1, now)
    assert decision.retrain_needed is retrain
    assert History(history.path).previous_map50(1) == now


def test_a_published_candidates_score_is_its_first_evaluation(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    deployed = _judge_and_append(history, 1, 0.70, candidate=0.90, published=2)
    assert deployed.deploy is True
    assert history.previous_map50(2) == 0.90
    assert history.previous_map50(1) == 0.70
    as_served = _judge_and_append(history, 2, 0.85)
    assert (as_served.previous_served_map50, as_served.retrain_needed) == (0.90, True)


def test_a_refused_candidate_is_no_versions_evaluation(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    refused = _judge_and_append(history, 1, 0.70, candidate=0.72, published=2)
    assert refused.deploy is False, "exactly +0.02 is not deployed"
    assert history.previous_map50(2) is None
    assert history.previous_map50(1) == 0.70


def test_other_sets_kinds_and_versions_never_feed_the_delta(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    history.append(
        {"kind": "bootstrap", "set": "synthetic-held-out", "candidate": {"map50": 0.97}, "published_version": 1}
    )
    history.append({"kind": "rollback", "source_version": 1, "rolled_back_from": 2, "published_version": 3})
    _judge_and_append(history, 4, 0.66)
    assert history.previous_map50(1) is None
    assert history.previous_map50(3) is None
    assert history.previous_map50(4) == 0.66


def test_a_torn_last_line_is_skipped_and_lines_are_never_rewritten(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    _judge_and_append(history, 1, 0.70)
    first_line = history.path.read_text()
    with history.path.open("a") as fh:
        fh.write('{"kind": "train", "set": "hold')  # a crash mid-write
    assert history.previous_map50(1) == 0.70
    assert len(list(history.records())) == 1
    decision = _judge_and_append(history, 1, 0.60)
    assert decision.previous_served_map50 == 0.70
    text = history.path.read_text()
    assert text.startswith(first_line), "existing lines are never rewritten"
    assert json.loads(text.splitlines()[-1])["served"]["map50"] == 0.60
    assert history.previous_map50(1) == 0.60


def test_the_file_is_readable_by_anyone(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    _judge_and_append(history, 1, 0.70)
    assert os.stat(history.path).st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_one_training_run_at_a_time(tmp_path: Path) -> None:
    with training_lock(tmp_path):
        assert (tmp_path / "train.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(TrainingError, match=f"pid {os.getpid()}"):
            with training_lock(tmp_path):
                pass
    with training_lock(tmp_path):
        pass
