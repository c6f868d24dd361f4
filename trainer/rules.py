"""The promotion rules, as pure functions: when to re-train, and when a candidate may be served.

- Re-train when the served model's mAP50 is below ``retrain_below_map50`` (0.60), or when it
  moved by less than ``retrain_delta_map50`` (-0.03) since its previous evaluation.
- Deploy when the candidate's mAP50 beats the served one's by more than ``deploy_margin_map50``
  (0.02). With nothing served, any candidate is deployed.

mAP50 values are floats, so a difference that is exactly a threshold in decimals is not one in
floats (``0.72 - 0.70`` is ``0.020000000000000018``, ``0.77 - 0.80`` is ``-0.030000000000000027``).
Every difference is therefore rounded to 9 decimals before it is compared: a value within float
noise (under 5e-10) of a threshold counts as ON it, and the rule as written decides (strict ``<``
/ ``>``: on the threshold never re-trains and never deploys). Any real difference, 1e-9 and up,
counts as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from core.settings import Settings
from trainer.evaluate import EvalResult

__all__ = ["Decision", "MetricDecision", "Rules", "decide", "decide_metric"]

_NDIGITS = 9


@dataclass(frozen=True)
class Rules:
    """The thresholds behind a decision (from settings; the seed project's values by default)."""

    retrain_below_map50: float = 0.60
    retrain_delta_map50: float = -0.03
    deploy_margin_map50: float = 0.02

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(
            retrain_below_map50=settings.retrain_below_map50,
            retrain_delta_map50=settings.retrain_delta_map50,
            deploy_margin_map50=settings.deploy_margin_map50,
        )


@dataclass(frozen=True)
class Decision:
    """What the rules say, and every number they looked at."""

    retrain_needed: bool
    deploy: bool
    reasons: tuple[str, ...]
    rules: Rules
    served_map50: float | None = None
    previous_served_map50: float | None = None
    delta_map50: float | None = None
    candidate_map50: float | None = None
    margin_map50: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reasons"] = list(self.reasons)
        return data


def _diff(a: float, b: float) -> float:
    """``a - b`` without float noise (see the module docstring)."""
    return round(a - b, _NDIGITS)


def _judge(
    label: str,
    candidate: float | None,
    incumbent: float | None,
    previous: float | None,
    thresholds: tuple[float, float, float],
) -> tuple[bool, bool, list[str], float | None, float | None]:
    """The rules on one metric called ``label``: (retrain, deploy, reasons, Δ of the served, candidate margin)."""
    below, min_delta, deploy_margin = thresholds
    reasons: list[str] = []
    retrain = deploy = False
    delta: float | None = None
    margin: float | None = None
    if incumbent is None:
        retrain = True
        reasons.append("no served model: training is needed")
    else:
        if _diff(incumbent, below) < 0:
            retrain = True
            reasons.append(f"served {label} {incumbent:.4f} < {below:.4f}: re-train")
        else:
            reasons.append(f"served {label} {incumbent:.4f} >= {below:.4f}")
        if previous is None:
            reasons.append(f"no previous evaluation of the served model: no Δ{label} yet")
        else:
            delta = _diff(incumbent, previous)
            if _diff(delta, min_delta) < 0:
                retrain = True
                reasons.append(f"served Δ{label} {delta:+.4f} < {min_delta:+.4f}: re-train")
            else:
                reasons.append(f"served Δ{label} {delta:+.4f} >= {min_delta:+.4f}")
    if candidate is None:
        reasons.append("no candidate: nothing to deploy")
    elif incumbent is None:
        deploy = True
        reasons.append(f"candidate {label} {candidate:.4f} and nothing served: deploy")
    else:
        margin = _diff(candidate, incumbent)
        verdict = "deploy" if _diff(margin, deploy_margin) > 0 else "keep the served model"
        deploy = verdict == "deploy"
        sign = ">" if deploy else "<="
        reasons.append(
            f"candidate {label} {candidate:.4f} {sign} served {incumbent:.4f} + {deploy_margin:.4f}: {verdict}"
        )
    return retrain, deploy, reasons, delta, margin


def decide(
    candidate: EvalResult | None,
    incumbent: EvalResult | None,
    previous_incumbent_map50: float | None,
    rules: Rules,
) -> Decision:
    """Apply the rules; ``previous_incumbent_map50`` must be read from history BEFORE this run is appended."""
    thresholds = (rules.retrain_below_map50, rules.retrain_delta_map50, rules.deploy_margin_map50)
    retrain, deploy, reasons, delta, margin = _judge(
        "mAP50",
        candidate.map50 if candidate is not None else None,
        incumbent.map50 if incumbent is not None else None,
        previous_incumbent_map50,
        thresholds,
    )
    return Decision(
        retrain_needed=retrain,
        deploy=deploy,
        reasons=tuple(reasons),
        rules=rules,
        served_map50=incumbent.map50 if incumbent is not None else None,
        previous_served_map50=previous_incumbent_map50,
        delta_map50=delta,
        candidate_map50=candidate.map50 if candidate is not None else None,
        margin_map50=margin,
    )


@dataclass(frozen=True)
class MetricDecision:
    """The rules applied to a head's own metric (``macro_f1``, ``miou``): the same rules, any metric."""

    metric: str
    retrain_needed: bool
    deploy: bool
    reasons: tuple[str, ...]
    retrain_below: float
    retrain_delta: float
    deploy_margin: float
    served: float | None = None
    previous_served: float | None = None
    delta: float | None = None
    candidate: float | None = None
    margin: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reasons"] = list(self.reasons)
        return data


def decide_metric(
    metric: str,
    candidate: float | None,
    served: float | None,
    previous_served: float | None,
    thresholds: tuple[float, float, float],
) -> MetricDecision:
    """``decide`` for any metric; ``thresholds`` is (retrain below, retrain Δ, deploy margin)."""
    retrain, deploy, reasons, delta, margin = _judge(metric, candidate, served, previous_served, thresholds)
    return MetricDecision(
        metric=metric,
        retrain_needed=retrain,
        deploy=deploy,
        reasons=tuple(reasons),
        retrain_below=thresholds[0],
        retrain_delta=thresholds[1],
        deploy_margin=thresholds[2],
        served=served,
        previous_served=previous_served,
        delta=delta,
        candidate=candidate,
        margin=margin,
    )
