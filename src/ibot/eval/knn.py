"""Weighted k-NN classification on frozen features (DINO/iBOT protocol).

Features are L2-normalised; similarity is the cosine; the 200 nearest training images vote
with weights exp(s / T), T = 0.07; class scores are summed over the first k neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ibot.eval.features import require_labels


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: tuple[int, ...] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, tuple[float, float]]:
    """Top-1 and top-5 accuracy (in %) for each k.

    Args:
        train_features: (X, D); train_labels: (X,) int64 in [0, C).
        test_features: (Y, D); test_labels: (Y,).
    """
    require_labels(train_labels, "the train features", "k-NN")
    require_labels(test_labels, "the test features", "k-NN")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k_max = min(max(ks), train.shape[0])
    correct = {k: [0, 0] for k in ks}
    for start in range(0, test.shape[0], chunk_size):
        queries = test[start : start + chunk_size]
        targets = test_labels[start : start + chunk_size]
        sims, idx = (queries @ train.T).topk(k_max, dim=1)  # (q, k_max), descending
        weights = (sims / temperature).exp()
        neighbour_labels = train_labels[idx]  # (q, k_max)
        votes = F.one_hot(neighbour_labels, num_classes).float() * weights.unsqueeze(-1)  # (q, k_max, C)
        for k in ks:
            scores = votes[:, : min(k, k_max)].sum(dim=1)  # (q, C)
            top = scores.topk(min(5, num_classes), dim=1).indices
            correct[k][0] += int((top[:, 0] == targets).sum())
            correct[k][1] += int((top == targets.unsqueeze(1)).any(dim=1).sum())
    n = test.shape[0]
    return {k: (100.0 * c1 / n, 100.0 * c5 / n) for k, (c1, c5) in correct.items()}
