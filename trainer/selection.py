"""Which unlabelled tasks to label next: batch selection strategies for active learning (numpy only).

Every strategy picks ``batch`` indices into a pool from per-task scores, lower meaning more
informative (the task-level ``score`` the bridge writes: :func:`core.uncertainty.margin` for the
classifier, the least confident box for the detector), and optionally one feature vector per task:

``random``       a seeded random sample, the control every other strategy is measured against;
``uncertainty``  the lowest scores first (ties broken by index, so the result is deterministic);
``diverse``      uncertainty within clusters: the ``DIVERSE_POOL`` x batch least certain candidates are
                 clustered by k-means (k = batch, k-means++ seeding, cosine geometry: features L2-normalised)
                 and each cluster gives its least certain task; clusters that come out empty or a
                 pool without features fall back to the next lowest scores. Plain uncertainty tends
                 to pick near-duplicates (the same hard case many times); this spreads one batch
                 over different kinds of hard case.

All three are deterministic for a ``seed`` and return distinct indices, ``min(batch, pool)`` of them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

__all__ = ["DIVERSE_POOL", "STRATEGIES", "diverse", "kmeans", "random", "select", "uncertainty"]

# How many times the batch the diverse strategy clusters, taken from the least certain end of the pool.
DIVERSE_POOL = 3
_KMEANS_ITERATIONS = 50

Scores = npt.ArrayLike
Features = npt.ArrayLike | None
Strategy = Callable[[Scores, int, Features, int], npt.NDArray[np.int64]]


def _scores(scores: Scores) -> npt.NDArray[np.float64]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be one number per task, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores must not be NaN")
    return s


def _check_batch(batch: int) -> None:
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")


def _by_score(s: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Indices, lowest score first; equal scores in index order."""
    order: npt.NDArray[np.int64] = np.argsort(s, kind="stable").astype(np.int64)
    return order


def random(scores: Scores, batch: int, features: Features = None, seed: int = 0) -> npt.NDArray[np.int64]:
    """``batch`` distinct indices drawn uniformly at random (scores only give the pool's size)."""
    _check_batch(batch)
    n = len(_scores(scores))
    picked: npt.NDArray[np.int64] = np.random.default_rng(seed).permutation(n)[: min(batch, n)].astype(np.int64)
    return picked


def uncertainty(scores: Scores, batch: int, features: Features = None, seed: int = 0) -> npt.NDArray[np.int64]:
    """The ``batch`` lowest scores (least certain first)."""
    _check_batch(batch)
    return _by_score(_scores(scores))[:batch]


def kmeans(x: npt.ArrayLike, k: int, seed: int = 0, iterations: int = _KMEANS_ITERATIONS) -> npt.NDArray[np.int64]:
    """Lloyd's k-means with k-means++ seeding; the cluster of each row (deterministic for ``seed``)."""
    points = np.asarray(x, dtype=np.float64)
    n = len(points)
    if points.ndim != 2 or n == 0:
        raise ValueError(f"k-means needs a non-empty (n, d) array, got shape {points.shape}")
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = np.empty((k, points.shape[1]))
    centres[0] = points[rng.integers(n)]
    nearest = ((points - centres[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        total = nearest.sum()
        idx = int(rng.choice(n, p=nearest / total)) if total > 0 else int(rng.integers(n))
        centres[j] = points[idx]
        nearest = np.minimum(nearest, ((points - centres[j]) ** 2).sum(axis=1))
    labels = np.zeros(n, dtype=np.int64)
    for step in range(iterations):
        distances = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        new = distances.argmin(axis=1).astype(np.int64)
        if step > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = points[labels == j]
            if len(members):
                centres[j] = members.mean(axis=0)
    return labels


def _normalised(features: npt.ArrayLike) -> npt.NDArray[np.float64]:
    f = np.asarray(features, dtype=np.float64)
    f = f.reshape(len(f), -1)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    out: npt.NDArray[np.float64] = f / np.where(norms > 0, norms, 1.0)
    return out


def diverse(scores: Scores, batch: int, features: Features = None, seed: int = 0) -> npt.NDArray[np.int64]:
    """The least certain task of each of ``batch`` k-means clusters of the ``DIVERSE_POOL`` x batch least
    certain candidates' L2-normalised features; topped up by the lowest scores left (module docstring)."""
    _check_batch(batch)
    s = _scores(scores)
    order = _by_score(s)
    if features is None or batch <= 1 or len(s) <= batch:
        return order[:batch]
    f = np.asarray(features)
    if len(f) != len(s):
        raise ValueError(f"{len(s)} scores but {len(f)} feature rows")
    candidates = order[: DIVERSE_POOL * batch]
    labels = kmeans(_normalised(f[candidates]), batch, seed)
    picked: list[int] = []
    for cluster in range(batch):
        members = candidates[labels == cluster]  # candidates are in score order: the first is the least certain
        if len(members):
            picked.append(int(members[0]))
    chosen = set(picked)
    picked += [int(i) for i in order if int(i) not in chosen][: batch - len(picked)]
    result = np.asarray(sorted(picked, key=lambda i: (s[i], i)), dtype=np.int64)
    return result


STRATEGIES: dict[str, Strategy] = {"random": random, "uncertainty": uncertainty, "diverse": diverse}


def select(
    strategy: str, scores: Scores, batch: int, features: Features = None, seed: int = 0
) -> npt.NDArray[np.int64]:
    """Run the strategy called ``strategy`` (one of ``STRATEGIES``)."""
    try:
        pick = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}") from None
    return pick(scores, batch, features, seed)
