"""The promotion rules, each on its own and on its boundary (the seed's Δ rule never fired)."""

from __future__ import annotations

import pytest

from trainer.evaluate import EvalResult
from trainer.rules import Rules, decide

RULES = Rules()


def _ev(map50: float) -> EvalResult:
    return EvalResult(map50=map50, map50_95=map50 / 2, precision=0.5, recall=0.5, per_class_ap50={"a": map50})


def test_defaults_are_the_seed_thresholds() -> None:
    assert (RULES.retrain_below_map50, RULES.retrain_delta_map50, RULES.deploy_margin_map50) == (0.60, -0.03, 0.02)


@pytest.mark.parametrize(("served", "retrain"), [(0.59, True), (0.5999, True), (0.60, False), (0.61, False)])
def test_retrain_below_threshold(served: float, retrain: bool) -> None:
    decision = decide(None, _ev(served), None, RULES)
    assert decision.retrain_needed is retrain
    assert decision.served_map50 == served
    assert decision.delta_map50 is None


@pytest.mark.parametrize(
    ("previous", "now", "retrain"),
    [(0.80, 0.77, False), (0.80, 0.7699, True), (0.80, 0.70, True), (0.80, 0.85, False), (0.75, 0.72, False)],
)
def test_retrain_on_delta(previous: float, now: float, retrain: bool) -> None:
    decision = decide(None, _ev(now), previous, RULES)
    assert decision.retrain_needed is retrain
    assert decision.previous_served_map50 == previous
    assert decision.delta_map50 == pytest.approx(now - previous)


@pytest.mark.parametrize(
    ("served", "candidate", "deploy"),
    [(0.70, 0.72, False), (0.70, 0.7201, True), (0.70, 0.90, True), (0.70, 0.60, False), (0.93, 0.95, False)],
)
def test_deploy_margin(served: float, candidate: float, deploy: bool) -> None:
    decision = decide(_ev(candidate), _ev(served), None, RULES)
    assert decision.deploy is deploy
    assert decision.margin_map50 == pytest.approx(candidate - served)
    assert any(("deploy" if deploy else "keep the served model") in r for r in decision.reasons)


def test_nothing_served_deploys_any_candidate_and_needs_training() -> None:
    decision = decide(_ev(0.1), None, None, RULES)
    assert decision.deploy and decision.retrain_needed
    assert decision.served_map50 is None and decision.margin_map50 is None


def test_no_candidate_never_deploys() -> None:
    decision = decide(None, _ev(0.2), 0.3, RULES)
    assert not decision.deploy
    assert decision.retrain_needed


def test_thresholds_are_settable() -> None:
    strict = Rules(retrain_below_map50=0.9, retrain_delta_map50=-0.001, deploy_margin_map50=0.0)
    decision = decide(_ev(0.86), _ev(0.85), 0.852, strict)
    assert decision.retrain_needed and decision.deploy
    assert len(decision.reasons) == 3


def test_decision_serialises_every_number() -> None:
    data = decide(_ev(0.8), _ev(0.7), 0.75, RULES).to_dict()
    assert data["served_map50"] == 0.7
    assert data["previous_served_map50"] == 0.75
    assert data["delta_map50"] == pytest.approx(-0.05)
    assert data["candidate_map50"] == 0.8
    assert data["margin_map50"] == pytest.approx(0.1)
    assert data["rules"] == {"retrain_below_map50": 0.6, "retrain_delta_map50": -0.03, "deploy_margin_map50": 0.02}
    assert isinstance(data["reasons"], list)
