"""Locality inside the transformer blocks: an MLP with a depthwise convolution over the patch grid.

A ViT's blocks see no neighbourhood: every relation between nearby patches has to be learned
by attention from data, which a short budget on small images does not give it. LocalViT (Li et
al. 2021) and CeiT's LeFF (Yuan et al. 2021) put a 3x3 depthwise convolution between the two
layers of each block's MLP. Here it is a residual branch on the hidden patch features, so the
block stays timm's when its weights are zero. Prefix tokens ([cls]) skip it. Masked patches
are [mask] tokens by then, so the convolution spreads no masked content to their neighbours.

Measured on the 2-core CPU (docs/cifar10.md, session 12): the grouped convolution is slow there
(~32 ms forward + backward per block for 128 ViT-Tiny/4 crops of 32 px), so a CIFAR-10 step
took ~1.5x as long, and at 20 equal training minutes the option ended 0.6-1.6 k-NN points
below the plain MLP. Not measured on a GPU, where such a convolution is cheap.
"""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp
from torch import nn


class DepthwiseConvMlp(Mlp):
    """timm's ``Mlp`` (pass as ``mlp_layer``) plus ``act(dwconv3x3(h))`` added to the hidden patch features."""

    def __init__(self, in_features: int, hidden_features: int | None = None, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(in_features, hidden_features, *args, **kwargs)
        hidden = self.fc1.out_features
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.num_prefix_tokens = 1  # timm's ViT: the [cls] token, no registers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        b, n, c = patches.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"model.mlp_dwconv needs a square patch grid, got {n} patch tokens")
        grid = patches.transpose(1, 2).reshape(b, c, side, side)
        local = self.act(self.dwconv(grid)).flatten(2).transpose(1, 2)
        x = torch.cat([prefix, patches + local], dim=1)
        return self.drop2(self.fc2(self.norm(x)))
