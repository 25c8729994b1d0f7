"""Unsupervised classification: k-means on frozen [cls] features, scored against the labels.

The features are L2-normalised (k-means in Euclidean space then clusters by cosine, as the
k-NN protocol compares them); k is the number of classes; k-means runs from several seeded
starts and keeps the one of lowest inertia (its own objective, never the labels). The
clusters are scored as the official iBOT evaluation scores them: NMI, ARI and FMI (scikit-learn) and the
accuracy of the best one-to-one mapping of clusters to classes (the Hungarian algorithm on the
confusion matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ibot.errors import IBOTError
from ibot.extras import require

EXTRA = "cluster"  # the pyproject extra that installs scikit-learn


def sklearn_module(name: str):  # type: ignore[no-untyped-def]
    """``sklearn.<name>``, or one line naming the extra that installs it."""
    return require(f"sklearn.{name}", EXTRA, "this evaluation (scikit-learn)")


@dataclass(frozen=True)
class ClusterScores:
    """Agreement of cluster assignments with the labels: accuracy (%), NMI, ARI and FMI."""

    accuracy: float
    nmi: float
    ari: float
    fmi: float  # Fowlkes-Mallows: geometric mean of pair precision and recall

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "nmi": self.nmi, "ari": self.ari, "fmi": self.fmi}


def hungarian_accuracy(labels: np.ndarray, assignments: np.ndarray) -> float:
    """Top-1 (%) of ``assignments`` once each cluster is mapped to one class, the mapping that
    maximises the matches (clusters and classes may differ in number: the extra ones match none)."""
    labels, assignments = np.asarray(labels), np.asarray(assignments)
    if labels.size == 0:
        return 0.0
    confusion = np.zeros((assignments.max() + 1, labels.max() + 1), dtype=np.int64)
    np.add.at(confusion, (assignments, labels), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    return 100.0 * confusion[rows, cols].sum() / labels.size


def cluster_scores(labels: np.ndarray, assignments: np.ndarray) -> ClusterScores:
    """Hungarian accuracy, NMI (arithmetic normalisation), ARI and FMI of ``assignments``."""
    metrics = sklearn_module("metrics")
    return ClusterScores(
        hungarian_accuracy(labels, assignments),
        float(metrics.normalized_mutual_info_score(labels, assignments)),
        float(metrics.adjusted_rand_score(labels, assignments)),
        float(metrics.fowlkes_mallows_score(labels, assignments)),
    )


@dataclass(frozen=True)
class KMeansResult:
    """The restart of lowest inertia: its assignments, inertia, and index among the restarts."""

    assignments: np.ndarray
    inertia: float
    restart: int
    inertias: tuple[float, ...]  # of every restart, in order


def kmeans(features: torch.Tensor, k: int, restarts: int, seed: int) -> KMeansResult:
    """k-means of the L2-normalised rows of ``features`` (X, D); restart r starts from seed ``seed + r``."""
    cluster = sklearn_module("cluster")
    points = F.normalize(features.float(), dim=1).numpy().astype(np.float64)
    runs = [cluster.KMeans(n_clusters=k, n_init=1, random_state=seed + r).fit(points) for r in range(restarts)]
    inertias = tuple(float(run.inertia_) for run in runs)
    best = int(np.argmin(inertias))
    return KMeansResult(runs[best].labels_.astype(np.int64), inertias[best], best, inertias)


def evaluate_clustering(features: torch.Tensor, labels: torch.Tensor, restarts: int, seed: int) -> dict:
    """k-means with k = the number of classes present in ``labels``, scored against them."""
    y = labels.numpy()
    k = int(np.unique(y).size)
    if k < 2:
        raise IBOTError(f"clustering needs at least 2 classes; the folder has {k}")
    result = kmeans(features, k, restarts, seed)
    return {
        "images": int(y.size),
        "clusters": k,
        "restarts": restarts,
        "best_restart": result.restart,
        "inertia": result.inertia,
        **cluster_scores(y, result.assignments).as_dict(),
    }
