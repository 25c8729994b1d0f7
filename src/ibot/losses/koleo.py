"""KoLeo regulariser (Sablayrolles et al. 2019, used by DINOv2): spread features in the batch.

loss = -mean_i log(min_{j != i} ||x_i - x_j||) over L2-normalised features x. It is the
differential-entropy estimate of Kozachenko-Leonenko: it grows when two images sit on the
same point, so it pushes back against the "every image gets the same [cls]" collapse that a
randomly initialised ViT starts next to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """features (B, D) -> scalar; each row's nearest neighbour is found among the other rows."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[0] < 2:
            raise ValueError(f"KoLeo needs (B >= 2, D) features, got {tuple(features.shape)}")
        with torch.autocast(features.device.type, enabled=False):
            x = F.normalize(features.float(), dim=-1, eps=self.eps)
            similarity = x @ x.T
            similarity.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
            neighbour = similarity.argmax(dim=1)
            distance = F.pairwise_distance(x, x[neighbour], eps=self.eps)
            return -torch.log(distance + self.eps).mean()
