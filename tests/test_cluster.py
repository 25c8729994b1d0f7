"""``ibot eval cluster``: Hungarian accuracy / NMI / ARI, seeded k-means restarts, the CLI round trip."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ibot.errors import IBOTError
from ibot.eval.cluster import cluster_scores, evaluate_clustering, hungarian_accuracy, kmeans


def test_a_permutation_of_the_labels_scores_perfectly() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    scores = cluster_scores(labels, np.array([2, 2, 0, 0, 1, 1, 1]))
    assert scores.accuracy == 100.0 and scores.nmi == pytest.approx(1.0) and scores.ari == pytest.approx(1.0)
    assert scores.fmi == pytest.approx(1.0)


def test_scores_match_hand_computed_values() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    clusters = np.array([0, 0, 1, 1, 1, 1])  # confusion: cluster 0 = {0, 0}, cluster 1 = {0, 1, 1, 1}
    scores = cluster_scores(labels, clusters)
    assert scores.accuracy == pytest.approx(100 * 5 / 6)  # 0 -> 0 (2 right), 1 -> 1 (3 right)
    # ARI: pairs within cells 1 + 3 = 4, within clusters 1 + 6 = 7, within classes 3 + 3 = 6, all 15.
    expected = 7 * 6 / 15
    assert scores.ari == pytest.approx((4 - expected) / ((7 + 6) / 2 - expected))
    assert scores.fmi == pytest.approx(4 / math.sqrt(7 * 6))  # same-cell pairs / sqrt(cluster x class pairs)
    mutual = math.log(2) / 6 + math.log(1.5) / 2  # sum of p_ij log(p_ij / (p_i p_j)) over the 3 cells
    h_clusters = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    assert scores.nmi == pytest.approx(mutual / ((math.log(2) + h_clusters) / 2))


def test_more_clusters_than_classes_match_one_each() -> None:
    assert hungarian_accuracy(np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3])) == 50.0


def test_random_assignments_score_near_chance() -> None:
    rng = np.random.default_rng(0)
    labels, clusters = rng.integers(0, 10, 5000), rng.integers(0, 10, 5000)
    scores = cluster_scores(labels, clusters)
    assert 10.0 <= scores.accuracy < 13.0  # the best matching of noise beats 10 % a little
    assert scores.nmi < 0.01 and abs(scores.ari) < 0.01 and scores.fmi < 0.11  # chance FMI ~ 1 / 10


def planted(classes: int = 4, per_class: int = 50, dim: int = 16, noise: float = 0.05, seed: int = 0):  # type: ignore[no-untyped-def]
    """Points around ``classes`` random directions (k-means sees them L2-normalised) and their labels."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    scale = torch.rand(len(labels), 1, generator=g) * 5 + 0.5  # the norm must not matter
    points = (centers[labels] + noise * torch.randn(len(labels), dim, generator=g)) * scale
    return points, labels


def test_kmeans_recovers_well_separated_classes() -> None:
    points, labels = planted()
    out = evaluate_clustering(points, labels, restarts=3, seed=0)
    assert out["clusters"] == 4 and out["images"] == 200
    assert out["accuracy"] == 100.0 and out["nmi"] == pytest.approx(1.0) and out["ari"] == pytest.approx(1.0)


def test_restarts_are_deterministic_per_seed_and_keep_the_best_inertia() -> None:
    points = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))  # no structure: starts disagree
    first, again = kmeans(points, 8, 4, seed=3), kmeans(points, 8, 4, seed=3)
    assert first.inertias == again.inertias and np.array_equal(first.assignments, again.assignments)
    assert len(set(first.inertias)) > 1
    assert first.inertia == min(first.inertias) == first.inertias[first.restart]
    assert kmeans(points, 8, 4, seed=4).inertias != first.inertias
    assert kmeans(points, 8, 1, seed=3).inertias == first.inertias[:1]  # restart r is seed + r


def test_one_class_is_refused() -> None:
    with pytest.raises(IBOTError, match="at least 2 classes"):
        evaluate_clustering(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), 1, 0)


def test_missing_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)  # import raises ImportError
    with pytest.raises(IBOTError, match=r"pip install 'ibot\[cluster\]'"):
        cluster_scores(np.array([0, 1]), np.array([1, 0]))


def test_cli_cluster_on_a_tiny_run(tiny_config, image_folder: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from ibot.cli import main
    from ibot.train.loop import train

    train(tiny_config, progress=False)
    run = tiny_config.train.output_dir
    args = ["eval", "cluster", run, "--train-dir", str(image_folder), "--test-dir", str(image_folder)]
    assert main([*args, "--no-progress", "eval.cluster_restarts=2"]) == 0
    assert "accuracy (Hungarian)" in capsys.readouterr().out
    result = json.loads((Path(run) / "eval" / "cluster.json").read_text())
    assert result["split"] == "test" and result["clusters"] == 2 and result["images"] == 16
    # Two far-apart class colours: even a pico model's k-means finds them.
    assert result["accuracy"] >= 90.0
    assert main([*args, "eval.cluster_split=val"]) == 2
    assert "eval.cluster_split" in capsys.readouterr().err
