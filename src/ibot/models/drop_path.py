"""Efficient stochastic depth: residual branches computed only for the samples that keep them.

timm's ``DropPath`` computes every branch for the whole batch and zeroes the dropped
samples. Here each branch picks ``ceil((1 - p) B)`` samples at random, runs on them alone and
adds its output back scaled by B / kept (the same expectation), so a drop rate p saves about
p of the branch's compute and activations (DINOv2's trick).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from timm.models.vision_transformer import Block


def residual_on_subset(
    x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], drop_rate: float
) -> torch.Tensor:
    """x (B, N, D) + branch(x) for a random subset of samples, scaled to keep the expectation."""
    batch = x.shape[0]
    keep = max(1, math.ceil(batch * (1 - drop_rate)))
    idx = torch.randperm(batch, device=x.device)[:keep]
    out = branch(x.index_select(0, idx))
    return torch.index_add(x, 0, idx, out.to(x.dtype), alpha=batch / keep)


class SubsetDropPathBlock(Block):
    """A timm ViT block with efficient stochastic depth (pass as ``block_fn``)."""

    def __init__(self, *args, drop_path: float = 0.0, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, drop_path=0.0, **kwargs)
        self.drop_rate = drop_path

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if not self.training or self.drop_rate == 0.0 or attn_mask is not None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = residual_on_subset(x, lambda y: self.ls1(self.attn(self.norm1(y), is_causal=is_causal)), self.drop_rate)
        return residual_on_subset(x, lambda y: self.ls2(self.mlp(self.norm2(y))), self.drop_rate)
