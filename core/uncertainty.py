"""How sure a model is, as one number Label Studio can sort tasks by (lower: less sure, label it first)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["margin"]


def margin(probs: Iterable[float]) -> float:
    """The top class probability minus the runner-up's: 0 is a coin toss, 1 certain (1.0 with one class)."""
    ranked = sorted((float(p) for p in probs), reverse=True)
    return ranked[0] - ranked[1] if len(ranked) > 1 else 1.0
