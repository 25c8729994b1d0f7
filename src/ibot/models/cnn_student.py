"""A timm CNN as a distillation student (``distill.student=timm:NAME``): its feature map as ``Tokens``.

``timm.create_model(NAME, pretrained=False, num_classes=0, in_chans=data.channels)``; no weights
are ever downloaded. The forward returns what ``MaskedViT`` returns, so distillation, the k-NN
monitor, evaluation, embeddings and pictures take either:

- ``cls`` (B, D): timm's own pooled output, ``forward_head(forward_features(x), pre_logits=True)``
  (global average pooling, plus the head norm of models that have one, e.g. ConvNeXt): exactly
  what the exported timm model returns for ``model(x)``.
- ``patches`` (B, h*w, D): the last feature map resized to the token grid of ``model.patch_size``
  px (``ibot distill`` requires the teacher's patch size there, so the grid is the teacher's):
  adaptive average pooling where the map is at least as fine as the grid (each token the mean of
  the cells it covers), bilinear interpolation where it is coarser (a stride-32 map of a small
  image), which averages nothing away and leaves no blocky copies.

D is the CNN's own ``num_features`` (``embed_dim``): no projection is kept here, since the
distillation's own projections or heads (``ibot.distill_method``) already map D to the teacher's
width; the backbone file then holds the timm model's own keys under ``cnn.``. The CNN never masks
(the patch objective runs on all tokens): the ``mask`` argument is accepted and ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ibot.config import Config
from ibot.errors import ConfigError, IBOTError
from ibot.models.vit import Tokens

PREFIX = "timm:"
KEY = "distill.student"


def cnn_name(student: str) -> str:
    """``timm:NAME`` -> NAME; ``vit`` -> "" (the ViT of ``model.*``)."""
    return student.removeprefix(PREFIX) if student.startswith(PREFIX) else ""


def check_name(name: str) -> None:
    """One line naming the key when timm does not know ``name``."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"{KEY}=timm:{name}: timm has no model of that name (timm.list_models() lists them)")


def resize_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, D, h, w) -> (B, D, *grid): adaptive average pooling when (h, w) covers ``grid``, else bilinear."""
    h, w = features.shape[-2:]
    if (h, w) == grid:
        return features
    if h >= grid[0] and w >= grid[1]:
        return F.adaptive_avg_pool2d(features, grid)
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


def check_crops(backbone: nn.Module, cfg: Config) -> None:
    """One line naming the crop size when the CNN cannot run on the run's smallest crop (timm's
    stems and downsampling need some pixels), before the run writes anything."""
    sizes = {"data.global_crop_size": cfg.data.global_crop_size}
    if cfg.data.num_local_crops:
        sizes["data.local_crop_size"] = cfg.data.local_crop_size
    key, size = min(sizes.items(), key=lambda item: item[1])
    mode = backbone.training
    try:
        with torch.no_grad():
            backbone.eval()(torch.zeros(2, cfg.data.channels, size, size))
    except (RuntimeError, AssertionError, ValueError) as exc:  # what timm's models raise on a bad input size
        reason = (str(exc).splitlines() or [""])[0][:160]
        raise ConfigError(f"{key}={size}: too small for {KEY}={cfg.distill.student} ({reason})") from None
    finally:
        backbone.train(mode)


class TimmCNN(nn.Module):
    """timm's ``NAME`` without a classifier, returning ``Tokens`` on a ``patch_size`` px grid."""

    def __init__(self, name: str, patch_size: int, in_chans: int = 3, drop_path_rate: float = 0.0) -> None:
        import timm

        super().__init__()
        check_name(name)
        extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.name = name
        self.cnn = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **extra)
        self.embed_dim: int = self.cnn.num_features
        self.patch_size = patch_size
        self.in_chans = in_chans

    def describe(self) -> str:
        """``timm NAME (P M parameters), D features, tokens of P px``: the start line's student."""
        count = sum(p.numel() for p in self.cnn.parameters()) / 1e6
        return f"timm {self.name} ({count:.2f}M parameters), {self.embed_dim} features, tokens of {self.patch_size} px"

    def no_weight_decay(self) -> set[str]:
        return set()  # biases and norms are 1-d: the param groups leave them undecayed anyway

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.cnn.set_grad_checkpointing(enabled)

    def set_residual_dtype(self, dtype: torch.dtype | None) -> None:
        """No token stream between blocks: autocast alone decides the dtypes."""

    def set_attention(self, kind: str) -> None:
        """No attention."""

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> Tokens:
        features = self.cnn.forward_features(images)
        cls = self.cnn.forward_head(features, pre_logits=True)
        d = self.embed_dim
        if features.ndim != 4 or features.shape[1] != d or cls.shape[-1] != d:
            # a timm ViT (tokens), a channels-last map (MambaOut), a pooled MLP head of another width
            raise ConfigError(
                f"{KEY}=timm:{self.name}: its features are no (B, {d}, H, W) map pooled to {d} values; "
                "name a CNN (resnet18, convnext_atto, efficientnet_b0, ...)"
            )
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        patches = resize_grid(features, grid).flatten(2).transpose(1, 2)
        return Tokens(cls=cls, patches=patches)

    def forward_intermediates(self, images: torch.Tensor, n_last: int = 1) -> list[Tokens]:
        if n_last != 1:
            raise IBOTError(
                f"{KEY}=timm:{self.name}: a CNN student has one feature map, not the last {n_last} blocks "
                "this evaluation reads; use ibot eval knn, embed or cluster"
            )
        return [self(images)]

    def last_attention(self, images: torch.Tensor) -> torch.Tensor:
        raise IBOTError(
            f"{KEY}=timm:{self.name}: a CNN student has no attention to draw; try ibot visualize pca or clusters"
        )
