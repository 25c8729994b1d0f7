"""iBOT masked-patch self-distillation loss: the teacher is the online tokenizer.

For every masked patch i of global crop c the student's distribution at the [mask] token
must match the teacher's centred, sharpened distribution at the same (unmasked) patch:

    loss = (1 / C) * sum_c (1 / max(n_c, 1)) * sum_{i masked in c} CE(p_t[i], p_s[i])

with C the number of global crops in the batch (unmasked crops included, contributing 0)
and n_c the masked count of crop c. This equals official iBOT's "masked mean per crop,
then mean over crops" and DINOv2's ``masks_weight`` formulation.
"""

from __future__ import annotations

import torch
from torch import nn

from ibot.losses.soft_ce import soft_cross_entropy


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between teacher and student patch distributions at masked positions only."""

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(
        self,
        student_patch_logits: torch.Tensor,
        teacher_patch_probs: torch.Tensor,
        mask: torch.Tensor,
        mask_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            student_patch_logits: (M, K) at the masked positions, in ``mask.nonzero()`` order.
            teacher_patch_probs: (M, K) at the same positions.
            mask: (C, N) bool, True = masked; M == mask.sum().
            mask_indices: (M,) flat indices of ``mask`` (computed here when not given).
        Returns:
            Scalar loss (0 when nothing is masked).
        """
        if student_patch_logits.shape != teacher_patch_probs.shape or mask.dim() != 2:
            raise ValueError(
                f"expected (M, K) logits and probs and a (C, N) mask, got {tuple(mask.shape)}, "
                f"{tuple(student_patch_logits.shape)} and {tuple(teacher_patch_probs.shape)}"
            )
        token_ce = soft_cross_entropy(student_patch_logits, teacher_patch_probs, self.student_temp)  # (M,)
        if mask_indices is None:
            mask_indices = mask.flatten().nonzero().flatten()
        per_crop = mask.sum(dim=1).clamp(min=1).float()  # (C,)
        token_weight = per_crop.index_select(0, mask_indices // mask.shape[1]).reciprocal()  # (M,) = 1 / n_c
        return (token_ce * token_weight).sum() / mask.shape[0]
