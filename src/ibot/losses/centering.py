"""EMA centering of teacher logits, the stabiliser that keeps one prototype from winning.

Teacher probabilities are ``softmax((z - c) / teacher_temp)`` (centering + sharpening); the
center follows ``c <- m * c + (1 - m) * mean(z)``, the batch mean all-reduced across
processes when ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class Center(nn.Module):
    """A (1, K) running mean of teacher logits, kept in fp32 as a buffer (saved in checkpoints)."""

    center: torch.Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(M, K) logits -> (M, K) centred, sharpened probabilities (fp32)."""
        return torch.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """EMA step towards the (global) mean of ``teacher_logits`` (M, K); M may be 0 locally."""
        stats = torch.cat(
            [
                teacher_logits.float().sum(dim=0),
                teacher_logits.new_tensor([teacher_logits.shape[0]], dtype=torch.float32),
            ]
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        count = stats[-1]
        batch_mean = stats[:-1] / count.clamp(min=1.0)
        # Nothing masked anywhere (count 0): the center stays put, decided without a host sync.
        new = self.center * self.momentum + batch_mean.unsqueeze(0) * (1 - self.momentum)
        self.center.copy_(torch.where(count > 0, new, self.center))
