"""The promotion rules through ``decide``: each rule on its boundary, in float arithmetic as mAP50s come.

Deploy only when candidate > served + 0.02; re-train when served < 0.60 or ΔmAP50 < -0.03. On a
threshold, or within float noise of it, neither fires (trainer/rules.py says why).
"""

from __future__ import annotations

import pytest

from core.settings import Settings
from trainer.evaluate import EvalResult
from trainer.rules import Rules, decide

RULES = Rules()
# Scores whose decimal difference is exactly a threshold; most are not in floats.
BASES = (0.1, 0.2, 0.25, 0.3, 0.33, 0.45, 0.5, 0.58, 0.6, 0.61, 0.7, 0.73, 0.8, 0.81, 0.9, 0.93, 0.96)


def _ev(map50: float) -> EvalResult:
    return EvalResult(map50=map50, map50_95=map50 / 2, precision=0.5, recall=0.5, per_class_ap50={"a": map50})


def _plus(base: float, step: float) -> float:
    """``base + step`` as a score would arrive: the nearest float to the decimal sum."""
    return float(f"{base + step:.6f}")


def test_the_boundaries_are_float_noise_not_decimals() -> None:
    """The sweeps below cross the noise: without rounding, some of these pairs would decide the other way."""
    assert any(_plus(b, 0.02) - b > 0.02 for b in BASES)
    assert any(_plus(b, -0.03) - b < -0.03 for b in BASES)
    assert 0.1 + 0.2 + 0.3 > 0.6 and 0.94 - 0.34 < 0.6


# --- deploy: candidate > served + 0.02 ---------------------------------------------------------


@pytest.mark.parametrize("served", BASES[:-1])
def test_a_candidate_exactly_002_better_is_not_deployed(served: float) -> None:
    decision = decide(_ev(_plus(served, 0.02)), _ev(served), None, RULES)
    assert decision.deploy is False
    assert decision.margin_map50 == 0.02
    assert decision.reasons[-1].endswith("keep the served model")


@pytest.mark.parametrize("served", BASES[:-1])
def test_a_candidate_more_than_002_better_is_deployed(served: float) -> None:
    decision = decide(_ev(_plus(served, 0.0201)), _ev(served), None, RULES)
    assert decision.deploy is True
    assert decision.reasons[-1].endswith(": deploy")


@pytest.mark.parametrize(
    ("candidate", "deploy"),
    [
        (0.72, False),
        (0.72 + 4e-10, False),  # float noise: on the threshold
        (0.72 - 4e-10, False),
        (0.72 + 1e-8, True),  # a real difference, however small
        (0.7199, False),
        (0.70, False),
        (0.60, False),
        (0.95, True),
    ],
)
def test_deploy_margin_near_the_threshold(candidate: float, deploy: bool) -> None:
    assert decide(_ev(candidate), _ev(0.70), None, RULES).deploy is deploy


def test_nothing_served_deploys_any_candidate_and_asks_for_training() -> None:
    decision = decide(_ev(0.1), None, None, RULES)
    assert decision.deploy and decision.retrain_needed
    assert (decision.served_map50, decision.margin_map50, decision.delta_map50) == (None, None, None)
    assert "no served model" in decision.reasons[0]


def test_no_candidate_never_deploys() -> None:
    decision = decide(None, _ev(0.2), None, RULES)
    assert not decision.deploy and decision.candidate_map50 is None
    assert "no candidate" in decision.reasons[-1]


def test_an_equal_or_worse_candidate_is_kept_out() -> None:
    assert not decide(_ev(0.7), _ev(0.7), None, RULES).deploy
    assert not decide(_ev(0.5), _ev(0.7), None, RULES).deploy


# --- re-train: served < 0.60 ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("served", "retrain"),
    [
        (0.60, False),
        (0.1 + 0.2 + 0.3, False),  # 0.6000000000000001
        (0.94 - 0.34, False),  # 0.5999999999999999: noise, still on the threshold
        (0.6 - 1e-8, True),
        (0.5999, True),
        (0.0, True),
        (0.6001, False),
        (1.0, False),
    ],
)
def test_retrain_below_060(served: float, retrain: bool) -> None:
    decision = decide(None, _ev(served), None, RULES)
    assert decision.retrain_needed is retrain
    assert decision.served_map50 == served
    assert ("re-train" in decision.reasons[0]) is retrain


# --- re-train: ΔmAP50 < -0.03 since the previous evaluation ----------------------------------


@pytest.mark.parametrize("previous", BASES[1:])
def test_a_drop_of_exactly_003_does_not_retrain(previous: float) -> None:
    now = _plus(previous, -0.03)
    decision = decide(None, _ev(now), previous, RULES)
    assert decision.delta_map50 == -0.03
    assert decision.retrain_needed is (now < 0.60), "only the 0.60 rule may fire here"
    assert "re-train" not in decision.reasons[1]


@pytest.mark.parametrize("previous", BASES[1:])
def test_a_drop_of_more_than_003_retrains(previous: float) -> None:
    decision = decide(None, _ev(_plus(previous, -0.0301)), previous, RULES)
    assert decision.retrain_needed is True
    assert decision.reasons[1].endswith(": re-train")


@pytest.mark.parametrize(
    ("now", "retrain"),
    [(0.77, False), (0.77 - 4e-10, False), (0.77 - 1e-8, True), (0.7699, True), (0.80, False), (0.95, False)],
)
def test_delta_near_the_threshold(now: float, retrain: bool) -> None:
    decision = decide(None, _ev(now), 0.80, RULES)
    assert decision.retrain_needed is retrain
    assert decision.previous_served_map50 == 0.80


def test_no_history_means_no_delta() -> None:
    decision = decide(None, _ev(0.80), None, RULES)
    assert decision.retrain_needed is False
    assert decision.delta_map50 is None and decision.previous_served_map50 is None
    assert "no previous evaluation" in decision.reasons[1]


def test_both_retrain_rules_and_the_deploy_rule_report_together() -> None:
    decision = decide(_ev(0.60), _ev(0.50), 0.70, RULES)
    assert decision.retrain_needed and decision.deploy
    assert [r.rsplit(": ", 1)[-1] for r in decision.reasons] == ["re-train", "re-train", "deploy"]


# --- settings --------------------------------------------------------------------------------


def test_thresholds_come_from_settings_and_keep_their_boundaries() -> None:
    rules = Rules.from_settings(
        Settings(retrain_below_map50=0.9, retrain_delta_map50=-0.001, deploy_margin_map50=0.0)  # type: ignore[call-arg]
    )
    assert (rules.retrain_below_map50, rules.retrain_delta_map50, rules.deploy_margin_map50) == (0.9, -0.001, 0.0)
    assert not decide(_ev(0.9), _ev(0.9), 0.901, rules).retrain_needed, "on both thresholds: no re-train, no deploy"
    assert not decide(_ev(0.9), _ev(0.9), 0.901, rules).deploy
    decision = decide(_ev(0.86), _ev(0.85), 0.852, rules)
    assert decision.retrain_needed and decision.deploy


def test_defaults_are_the_seed_thresholds() -> None:
    assert (RULES.retrain_below_map50, RULES.retrain_delta_map50, RULES.deploy_margin_map50) == (0.60, -0.03, 0.02)
    assert Rules.from_settings(Settings()) == RULES


def test_decision_serialises_every_number_without_noise() -> None:
    data = decide(_ev(0.8), _ev(0.7), 0.75, RULES).to_dict()
    assert data == {
        "retrain_needed": True,
        "deploy": True,
        "reasons": data["reasons"],
        "rules": {"retrain_below_map50": 0.6, "retrain_delta_map50": -0.03, "deploy_margin_map50": 0.02},
        "served_map50": 0.7,
        "previous_served_map50": 0.75,
        "delta_map50": -0.05,
        "candidate_map50": 0.8,
        "margin_map50": 0.1,
    }
    assert len(data["reasons"]) == 3
