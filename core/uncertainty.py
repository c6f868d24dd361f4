"""How sure a model is, as one number Label Studio can sort tasks by (lower: less sure, label it first)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

__all__ = ["entropy_score", "margin"]

# Keeps log2 finite; a probability this close to 0 or 1 counts as certain (entropy ~1e-5 bits).
_EPS = 1e-6


def margin(probs: Iterable[float]) -> float:
    """The top class probability minus the runner-up's: 0 is a coin toss, 1 certain (1.0 with one class)."""
    ranked = sorted((float(p) for p in probs), reverse=True)
    return ranked[0] - ranked[1] if len(ranked) > 1 else 1.0


def entropy_score(probs: npt.ArrayLike) -> float:
    """1 - the mean binary entropy (bits) of per-pixel probability maps (K, h, w): 0 all coin tosses, 1 certain.

    Each map is one class's foreground probability, an independent yes/no per pixel, so its binary
    entropy is 0 (sure) .. 1 bit (p = 0.5). Lower means the model is less sure of the image, as
    with :func:`margin`, so Label Studio's Data Manager, sorted by score ascending, queues it first.
    An empty array is certain (1.0).
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0 - _EPS)
    if p.size == 0:
        return 1.0
    entropy = -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))
    return float(np.clip(1.0 - entropy.mean(), 0.0, 1.0))
