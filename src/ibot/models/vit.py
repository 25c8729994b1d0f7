"""Masked ViT backbone: timm's VisionTransformer plus a learned [mask] token.

The [mask] token replaces masked patch embeddings *before* position embeddings are added
(iBOT, BEiT), so the student still knows where a masked patch sits. Position embeddings are
resampled for any input size (local crops), by timm's ``dynamic_img_size``. The patch embedding
is the ViT's linear patchify or, for short budgets and small images, a convolutional stem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import HybridEmbed, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ibot.config import ARCHS, ModelConfig
from ibot.models.drop_path import SubsetDropPathBlock
from ibot.models.local_mlp import DepthwiseConvMlp


def conv_stem(patch_size: int, embed_dim: int, convs_per_stage: int = 1, in_chans: int = 3) -> nn.Sequential:
    """3x3 stride-2 convolutions down to the patch grid (Xiao et al. 2021, "Early convolutions
    help transformers see better"): a ViT with it trains faster and more stably than one with a
    linear patchify, which matters most when the budget is short. Channels double per stage and
    reach ``embed_dim / 2``; a 1x1 projection to ``embed_dim`` follows (timm's ``HybridEmbed``).
    No BatchNorm: the EMA teacher runs in eval mode and would never see its running statistics
    follow the student's. ``convs_per_stage`` > 1 adds 3x3 stride-1 convolutions after each
    strided one (a deeper stem, more of a CNN's locality prior, at a few % of the ViT's FLOPs;
    it lost 4-7 k-NN points in CIFAR-10's 20-minute pilots, docs/cifar10.md, session 11).
    The convolutions overlap patch borders (with one per stage a token sees its own patch and
    the 3 pixel rows and columns above and left of it), so ``MaskedViT`` blanks masked patches'
    pixels before the stem. ``in_chans``: the channels of the input images (``data.channels``).
    """
    stages = patch_size.bit_length() - 1
    layers: list[nn.Module] = []
    in_channels = in_chans
    for i in range(stages):
        out_channels = embed_dim // 2 ** (stages - i)
        for j in range(convs_per_stage):
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=1 if j else 2, padding=1), nn.GELU()]
            in_channels = out_channels
    return nn.Sequential(*layers)


def _keep_pixels(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return images


@dataclass(frozen=True)
class Tokens:
    """Backbone outputs after the final norm: cls (B, D) and patches (B, N, D)."""

    cls: torch.Tensor
    patches: torch.Tensor


class MaskedViT(nn.Module):
    """A timm ViT whose forward takes an optional bool mask (B, N) and returns ``Tokens``."""

    def __init__(
        self,
        arch: str,
        patch_size: int,
        img_size: int,
        drop_path_rate: float = 0.0,
        efficient_drop_path: bool = True,
        depth: int = 0,
        stem: str = "patch",
        stem_convs_per_stage: int = 1,
        mlp_dwconv: bool = False,
        in_chans: int = 3,
    ) -> None:
        """``depth`` > 0 replaces the number of blocks of ``arch``; ``stem`` is "patch" (a linear
        patchify, the ViT's) or "conv" (``conv_stem``, for power-of-two patch sizes >= 2);
        ``mlp_dwconv`` gives each block's MLP a depthwise convolution (``DepthwiseConvMlp``);
        ``in_chans``: the channels of the input images (``data.channels``)."""
        super().__init__()
        shape = ARCHS[arch] | ({"depth": depth} if depth else {})
        if stem == "conv":
            if patch_size < 2 or patch_size & (patch_size - 1):
                raise ValueError(f"model.stem=conv needs a power-of-two patch size >= 2, got {patch_size}")
            backbone = conv_stem(patch_size, shape["embed_dim"], stem_convs_per_stage, in_chans)
            embed: dict = {"embed_layer": partial(HybridEmbed, backbone), "patch_size": 1}
        else:
            embed = {"patch_size": patch_size}
        self.vit = VisionTransformer(
            img_size=img_size,
            in_chans=in_chans,
            **embed,
            num_classes=0,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            block_fn=SubsetDropPathBlock if efficient_drop_path else Block,
            mlp_layer=DepthwiseConvMlp if mlp_dwconv else Mlp,
            **shape,
        )
        self.embed_dim: int = self.vit.embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self._run_blocks: Callable[[torch.Tensor], torch.Tensor] = self._plain_blocks
        # A linear patchify keeps patches apart; the conv stem's receptive fields would let the
        # tokens beside a masked patch see most of its pixels, and the student copy them.
        self._hide_masked_pixels = self._zero_masked_pixels if stem == "conv" else _keep_pixels
        self.residual_dtype: torch.dtype | None = None

    @staticmethod
    def from_config(cfg: ModelConfig, img_size: int, in_chans: int = 3) -> MaskedViT:
        """The backbone of ``cfg`` for ``img_size`` px crops of ``in_chans`` channels: a run passes its
        ``data.channels`` (the model has no channel key of its own: it sees what the data holds)."""
        return MaskedViT(
            cfg.arch,
            cfg.patch_size,
            img_size,
            drop_path_rate=cfg.drop_path_rate,
            efficient_drop_path=cfg.efficient_drop_path,
            depth=cfg.depth,
            stem=cfg.stem,
            stem_convs_per_stage=cfg.stem_convs_per_stage,
            mlp_dwconv=cfg.mlp_dwconv,
            in_chans=in_chans,
        )

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in backward instead of storing its activations (memory for time)."""
        self._run_blocks = self._checkpointed_blocks if enabled else self._plain_blocks

    def _plain_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.blocks(x)

    def _checkpointed_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.vit.blocks:
            x = checkpoint(block, x, use_reentrant=False) if torch.is_grad_enabled() else block(x)
        return x

    def set_residual_dtype(self, dtype: torch.dtype | None) -> None:
        """Carry the tokens between blocks in ``dtype`` (e.g. bf16) while autocast is on; None =
        as the embedding makes them (fp32). Under CPU autocast, LayerNorm keeps a bf16 input in
        bf16 and every add stays bf16, so the blocks then run without fp32 <-> bf16 copies."""
        self.residual_dtype = dtype

    def set_attention(self, kind: str) -> None:
        """ "sdpa": fused ``scaled_dot_product_attention``; "explicit": softmax(q k^T) v."""
        for module in self.vit.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = kind == "sdpa"

    def _zero_masked_pixels(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked patches' pixels set to 0 (the mean colour: images are normalised)."""
        b, _, h, w = images.shape
        p = self.patch_size
        pixels = mask.view(b, 1, h // p, 1, w // p, 1).expand(b, 1, h // p, p, w // p, p)
        return images.masked_fill(pixels.reshape(b, 1, h, w), 0.0)

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, 1 + N, D) with [mask] tokens and position embeddings."""
        if mask is None:
            x = self.vit.patch_embed(images)  # (B, h, w, D)
        else:
            x = self.vit.patch_embed(self._hide_masked_pixels(images, mask))
            b, h, w, d = x.shape
            x = torch.where(mask.view(b, h, w, 1), self.mask_token.to(x.dtype), x)
        x = self.vit._pos_embed(x)  # (B, 1 + N, D): [cls] prepended, position embeddings resampled
        x = self.vit.norm_pre(x)
        # Only under autocast: outside it the fp32 weights would meet bf16 tokens.
        if self.residual_dtype is not None and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.residual_dtype)
        return x

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> Tokens:
        x = self._run_blocks(self.embed(images, mask))
        x = self.vit.norm(x)
        return Tokens(cls=x[:, 0], patches=x[:, self.vit.num_prefix_tokens :])

    def forward_intermediates(self, images: torch.Tensor, n_last: int = 1) -> list[Tokens]:
        """``Tokens`` of the last ``n_last`` blocks, each after the final norm (for probes)."""
        x = self.embed(images)
        outputs = []
        depth = len(self.vit.blocks)
        for i, block in enumerate(self.vit.blocks):
            x = block(x)
            if i >= depth - n_last:
                y = self.vit.norm(x)
                outputs.append(Tokens(cls=y[:, 0], patches=y[:, self.vit.num_prefix_tokens :]))
        return outputs

    @torch.no_grad()
    def last_attention(self, images: torch.Tensor) -> torch.Tensor:
        """(B, heads, 1 + N, 1 + N) attention probabilities of the last block (for pictures)."""
        x = self.embed(images)
        for block in self.vit.blocks[:-1]:
            x = block(x)
        last = self.vit.blocks[-1]
        attn = last.attn
        y = last.norm1(x)
        b, n, _ = y.shape
        q, k, _ = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
