"""DINO self-distillation loss on [cls] tokens across multi-crop views.

loss = mean over pairs (t, s), t a teacher global crop and s a student crop with s != t, of
mean_b [ -sum_k p_t[b, k] * log_softmax(z_s[b] / student_temp)[k] ]   (Caron et al. 2021,
iBOT's ``iBOTLoss`` [cls] term). Student crop s < G is the masked view of global crop s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        student_log_probs = F.log_softmax(student_cls_logits.float() / self.student_temp, dim=-1)
        # (G, V): mean over images of the cross-entropy between teacher view t and student view s.
        # fp32 on purpose: autocast would run this einsum in bf16 and round the loss to 3 digits.
        with torch.autocast(student_log_probs.device.type, enabled=False):
            pair_ce = -torch.einsum("tbk,sbk->ts", teacher_cls_probs.float(), student_log_probs) / batch
        same_view = torch.eye(num_global, num_views, dtype=torch.bool, device=pair_ce.device)
        return pair_ce.masked_fill(same_view, 0.0).sum() / (num_global * num_views - num_global)
