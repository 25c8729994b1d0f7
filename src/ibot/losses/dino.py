"""DINO self-distillation loss on [cls] tokens across multi-crop views.

loss = mean over pairs (t, s), t a teacher global crop and s a student crop with s != t, of
mean_b [ -sum_k p_t[b, k] * log_softmax(z_s[b] / student_temp)[k] ]   (Caron et al. 2021,
iBOT's ``iBOTLoss`` [cls] term). Student crop s < G is the masked view of global crop s.
"""

from __future__ import annotations

import torch
from torch import nn

from ibot.losses.soft_ce import soft_cross_entropy


class DINOClsLoss(nn.Module):
    """Cross-entropy between teacher [cls] probabilities and every *other* student view."""

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(self, student_cls_logits: torch.Tensor, teacher_cls_probs: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_cls_logits: (V, B, K), the first G views are the global crops.
            teacher_cls_probs: (G, B, K), centred and sharpened.
        Returns:
            Scalar loss averaged over the G * V - G cross-view pairs.
        """
        if student_cls_logits.dim() != 3 or teacher_cls_probs.dim() != 3:
            raise ValueError(
                f"expected (V, B, K) and (G, B, K), got {tuple(student_cls_logits.shape)} "
                f"and {tuple(teacher_cls_probs.shape)}"
            )
        num_views, batch, _ = student_cls_logits.shape
        num_global = teacher_cls_probs.shape[0]
        if num_views < 2 or num_global > num_views:
            raise ValueError(f"need >= 2 student views and G <= V, got V={num_views}, G={num_global}")
        # Cross-entropy is linear in the target, so each student view is scored once against the
        # sum of the teacher views it is paired with (all of them but its own): one K-wide pass.
        all_teacher = teacher_cls_probs.sum(dim=0)  # (B, K)
        targets = torch.cat(
            [all_teacher - teacher_cls_probs, all_teacher.expand(num_views - num_global, batch, -1)]
        )  # (V, B, K)
        total = soft_cross_entropy(student_cls_logits.flatten(0, 1), targets.flatten(0, 1), self.student_temp).sum()
        return total / (batch * (num_global * num_views - num_global))
