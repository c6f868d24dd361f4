"""Batch selection strategies for active learning (trainer.selection): pure numpy, no models."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.selection import DIVERSE_POOL, STRATEGIES, diverse, kmeans, random, select, uncertainty


def test_uncertainty_picks_the_lowest_scores_least_certain_first() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.05, 0.7, 0.3])
    assert uncertainty(scores, 3).tolist() == [3, 1, 5]
    # Monotone: lowering a task's score never pushes it out of the batch.
    lowered = scores.copy()
    lowered[4] = 0.0
    assert uncertainty(lowered, 3).tolist() == [4, 3, 1]


def test_uncertainty_ties_break_by_index() -> None:
    assert uncertainty([0.2, 0.2, 0.2, 0.1], 3).tolist() == [3, 0, 1]


def test_random_is_seeded_distinct_and_covers_the_pool() -> None:
    a = random(np.zeros(50), 10, seed=3)
    assert a.tolist() == random(np.zeros(50), 10, seed=3).tolist()
    assert a.tolist() != random(np.zeros(50), 10, seed=4).tolist()
    assert len(set(a.tolist())) == 10 and all(0 <= i < 50 for i in a)
    assert sorted(random(np.zeros(5), 10).tolist()) == [0, 1, 2, 3, 4]


def _toy(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three tight clusters in 2-d; cluster 0 holds the lowest scores (near-duplicate hard cases)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    cluster = np.repeat([0, 1, 2], 4)
    features = centres[cluster] + rng.normal(0, 0.01, (12, 2))
    scores = np.array([0.01, 0.02, 0.03, 0.04, 0.2, 0.3, 0.4, 0.5, 0.25, 0.35, 0.45, 0.55])
    return scores, features, cluster


def test_diverse_picks_one_task_per_cluster_where_uncertainty_picks_duplicates() -> None:
    scores, features, cluster = _toy()
    assert {int(cluster[i]) for i in uncertainty(scores, 3)} == {0}
    picked = diverse(scores, 3, features, seed=0)
    assert len(set(picked.tolist())) == 3
    assert {int(cluster[i]) for i in picked} == {0, 1, 2}
    # The least certain member of each cluster.
    assert sorted(picked.tolist()) == [0, 4, 8]
    assert picked.tolist() == diverse(scores, 3, features, seed=0).tolist()


def test_diverse_only_clusters_the_least_certain_candidates() -> None:
    scores, features, _ = _toy()
    picked = diverse(scores, 2, features)
    candidates = set(uncertainty(scores, DIVERSE_POOL * 2).tolist())
    assert set(picked.tolist()) <= candidates


def test_diverse_without_features_is_uncertainty() -> None:
    scores, _, _ = _toy()
    assert diverse(scores, 3).tolist() == uncertainty(scores, 3).tolist()


def test_diverse_tops_up_when_clusters_collapse() -> None:
    scores = np.linspace(0, 1, 10)
    same = np.ones((10, 4))  # every feature identical: k-means finds one cluster
    picked = diverse(scores, 4, same)
    assert len(set(picked.tolist())) == 4


def test_kmeans_separates_clusters() -> None:
    _, features, cluster = _toy(1)
    labels = kmeans(features, 3, seed=0)
    for c in range(3):
        assert len(set(labels[cluster == c].tolist())) == 1
    assert len(set(labels.tolist())) == 3


def test_select_dispatches_and_rejects_unknown_names() -> None:
    assert set(STRATEGIES) == {"random", "uncertainty", "diverse"}
    assert select("uncertainty", [0.3, 0.1], 1).tolist() == [1]
    with pytest.raises(ValueError, match="unknown strategy"):
        select("entropy", [0.1], 1)
    with pytest.raises(ValueError):
        uncertainty([[0.1]], 1)


def test_summarise_labels_to_target_and_saving() -> None:
    from labelloop.bench_learning import summarise

    curves = {
        "random": [[0.2, 0.4, 0.6, 0.8, 1.0], [0.2, 0.4, 0.6, 0.8, 0.9]],
        "uncertainty": [[0.2, 0.6, 0.9, 0.95, 0.95], [0.2, 0.6, 0.9, 0.95, 0.95]],
    }
    report = summarise([10, 20, 30, 40, 50], curves)
    assert report["curves"]["random"][-1] == {"labels": 50, "mean": 0.95, "std": 0.05, "values": [1.0, 0.9]}
    assert report["target"] == pytest.approx(0.855)  # 0.9 x the best final mean (0.95)
    assert report["labels_to_target"] == {"random": 50, "uncertainty": 30}
    assert report["label_saving"] == pytest.approx(1 - 30 / 50)
    given = summarise([10, 20, 30, 40, 50], curves, target=0.99)
    assert given["labels_to_target"] == {"random": None, "uncertainty": None}
    assert given["label_saving"] is None and given["target_rule"] == "given"
    flat = summarise([10, 20], {"random": [[0.0, 0.0]], "uncertainty": [[0.0, 0.0]]})
    assert flat["labels_to_target"] == {"random": None, "uncertainty": None} and flat["label_saving"] is None
