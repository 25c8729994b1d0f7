"""Backbone weights from other code bases -> this package's ``MaskedViT`` keys and config.

Accepted: a plain timm ``VisionTransformer`` state dict, the official DINO / iBOT ViTs (same
parameter names as timm), DINOv2's hub ViTs (LayerScale folded into the layers it scales,
chunked blocks flattened; register tokens and SwiGLU feed-forwards refused), and full DINO /
iBOT checkpoints (their ``teacher`` entry, with ``module.`` / ``backbone.`` prefixes).
Classifier and projection heads are dropped. The
architecture is read off the tensors: width from the [cls] token, depth from the blocks,
patch size and input channels from the patch embedding, training resolution from the position
embeddings; the number of heads is the one of the ``ARCHS`` entry of that width (heads leave no
trace in the weights), another depth than the entry's is ``model.depth``, and a conv stem
(``patch_embed.backbone``) gives ``model.stem=conv`` with the patch size of its stages.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ibot.config import ARCHS
from ibot.errors import DataError

_PREFIXES = ("module.", "backbone.")
_DROPPED = ("head.", "fc_norm.", "head_drop.")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")  # DINOv2 BlockChunk: blocks.<chunk>.<block>.*


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def unwrap(loaded: Any, source: str) -> dict[str, torch.Tensor]:
    """The backbone's tensors inside whatever container a checkpoint file holds."""
    for entry in ("teacher", "model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(entry), dict):
            loaded = loaded[entry]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise DataError(f"{source}: not a state dict of tensors (nor one under 'teacher', 'model' or 'state_dict')")
    return loaded


def _flatten_chunks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2's ``blocks.<chunk>.<block>.*`` (``block_chunks`` > 0) -> ``blocks.<block>.*``."""
    return {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in tensors.items()}


def _fold_layer_scale(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ls1`` / ``ls2`` gammas multiplied into ``attn.proj`` / ``mlp.fc2``: the same function without
    LayerScale (each gamma scales the output channels of the layer just before it)."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith((".ls1.gamma", ".ls2.gamma"))]:
        block, scale = key.rsplit(".", 2)[0], out.pop(key)
        layer = f"{block}.attn.proj" if key.endswith(".ls1.gamma") else f"{block}.mlp.fc2"
        out[f"{layer}.weight"] = out[f"{layer}.weight"] * scale[:, None]
        if f"{layer}.bias" in out:
            out[f"{layer}.bias"] = out[f"{layer}.bias"] * scale
    return out


def _refuse_unsupported(keys: set[str], source: str) -> None:
    if "register_tokens" in keys:
        raise DataError(f"{source}: a ViT with register tokens (DINOv2 *_reg): not supported by this package's ViT")
    if any(k.endswith((".mlp.w12.weight", ".mlp.w3.weight")) for k in keys):
        raise DataError(
            f"{source}: a ViT with SwiGLU feed-forwards (DINOv2 ViT-g): not supported by this package's ViT"
        )


def vit_state(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm/DINO/iBOT/DINOv2 ViT tensors -> ``MaskedViT`` keys (``vit.*``; ``mask_token`` (1, 1, 1, D)
    when the file has one), and what was changed on the way (for a log line)."""
    plain = {_strip(k): v for k, v in tensors.items()}
    plain = {k: v for k, v in plain.items() if not k.startswith(_DROPPED)}
    _refuse_unsupported(set(plain), source)
    for required in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if required not in plain:
            raise DataError(f"{source}: no '{required}': not an ibot backbone nor a timm/DINO/iBOT ViT state dict")
    changes = []
    if any(_CHUNKED.match(k) for k in plain):
        plain = _flatten_chunks(plain)
        changes.append("chunked blocks flattened")
    if any(k.endswith((".ls1.gamma", ".ls2.gamma")) for k in plain):
        plain = _fold_layer_scale(plain)
        changes.append("LayerScale folded into attn.proj and mlp.fc2")
    # iBOT's learned [mask] embedding is ``masked_embed``, DINOv2's ``mask_token``; both (1, D).
    mask_token = plain.pop("masked_embed", None)
    mask_token = plain.pop("mask_token", mask_token)
    state = {f"vit.{k}": v for k, v in plain.items()}
    if mask_token is not None:
        state["mask_token"] = mask_token.reshape(1, 1, 1, -1)
    return state, changes


def import_vit(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """timm/DINO/iBOT ViT tensors -> (``MaskedViT`` state dict, config dict for ``config_from_dict``)."""
    state, _ = vit_state(tensors, source)
    width = state["vit.cls_token"].shape[-1]
    model = model_keys(state, source)
    patch_size = model["patch_size"]
    tokens = state["vit.pos_embed"].shape[1] - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise DataError(f"{source}: pos_embed of {tokens + 1} tokens is not 1 + a square grid")
    # timm and DINO have no [mask] token; evaluation never masks, so zeros stand in.
    state.setdefault("mask_token", torch.zeros(1, 1, 1, width))
    data: dict[str, Any] = {"global_crop_size": side * patch_size, **_channel_keys(state)}
    return state, {"model": model, "data": data}


def model_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """``model.*`` read off ``MaskedViT``-keyed tensors: ``arch`` from the width, ``depth`` when it is
    not the arch's, and the patch embedding's keys (``stem_keys``)."""
    width = state["vit.cls_token"].shape[-1]
    depth = block_count(state)
    # Heads leave no trace in the weights: the width names the arch (and its heads); another depth
    # is model.depth, as a shallower ViT of this package is saved.
    arch = next((name for name, a in ARCHS.items() if a["embed_dim"] == width), None)
    if arch is None:
        known = ", ".join(f"{n} ({a['embed_dim']})" for n, a in ARCHS.items())
        raise DataError(f"{source}: a ViT of width {width} is none of {known}")
    model: dict[str, Any] = {"arch": arch, **({"depth": depth} if depth != ARCHS[arch]["depth"] else {})}
    return {**model, **stem_keys(state)}


def stem_keys(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``model.patch_size`` (and ``stem``, ``stem_convs_per_stage``) read off the patch embedding:
    a linear patchify's kernel is the patch; a conv stem (timm's ``HybridEmbed``: 3x3 convolutions
    under ``patch_embed.backbone``, then a 1x1 projection) halves the grid once per stage, and its
    stages are told apart by their channels (each stage doubles them)."""
    indices = _layer_indices(state)
    if not indices:
        return {"patch_size": int(state["vit.patch_embed.proj.weight"].shape[-1])}
    convs = [state[f"vit.patch_embed.backbone.{i}.weight"] for i in sorted(indices)]
    stages = len({int(w.shape[0]) for w in convs})
    return {"patch_size": 2**stages, "stem": "conv", "stem_convs_per_stage": len(convs) // stages}


def _layer_indices(state: dict[str, torch.Tensor]) -> set[int]:
    """Indices of the conv stem's layers that hold a weight (the GELUs between them hold none)."""
    return {int(m.group(1)) for k in state if (m := re.match(r"vit\.patch_embed\.backbone\.(\d+)\.weight$", k))}


def _channel_keys(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``data.channels`` read off the patch embedding; for other than 3, ``data.mean`` / ``data.std``
    "auto": a weights file does not say how its images were normalised (ImageNet's numbers, the
    defaults, are RGB's), so the user gives them (``ibot.eval.features`` asks)."""
    first = "vit.patch_embed.backbone.0.weight" if _layer_indices(state) else "vit.patch_embed.proj.weight"
    channels = int(state[first].shape[1])  # the first convolution over the pixels
    return {} if channels == 3 else {"channels": channels, "mean": "auto", "std": "auto"}


def block_count(state: dict[str, torch.Tensor]) -> int:
    """Number of transformer blocks in a ``MaskedViT`` state dict (``vit.blocks.<i>.*`` keys)."""
    return len({m.group(1) for k in state if (m := re.match(r"vit\.blocks\.(\d+)\.", k))})
