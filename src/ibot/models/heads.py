"""DINO/iBOT projection head: MLP -> bottleneck -> L2 norm -> weight-normalised prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ibot.config import ModelConfig

# Rows entering a head are zero-padded to a multiple of this (see ``ProjectionHead.forward``).
ROW_MULTIPLE = 128


class ProjectionHead(nn.Module):
    """tokens (M, D) -> prototype logits (M, K).

    ``head_layers`` linear layers with GELU (hidden ``head_hidden_dim``, output
    ``head_bottleneck_dim``), L2 normalisation, then a bias-free weight-normalised linear
    layer onto K prototypes. With ``norm_last_layer`` the prototype norms stay fixed at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    @staticmethod
    def from_config(cfg: ModelConfig, in_dim: int) -> ProjectionHead:
        return ProjectionHead(
            in_dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_layers, cfg.norm_last_layer
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(M, D) -> (M, K), computed on M rounded up to a multiple of ``ROW_MULTIPLE`` rows.

        M (the masked tokens of a batch) changes every step, and on CPUs oneDNN builds and
        caches a matmul kernel for every new shape: that cost about a tenth of the step's time
        and 2-6 GB of memory within minutes (README, "Speed"). Zero rows are appended and
        their logits dropped, so the matmuls see a handful of shapes.
        """
        rows = x.shape[0]
        x = self.mlp(F.pad(x, (0, 0, 0, -rows % ROW_MULTIPLE)))
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)[:rows]
