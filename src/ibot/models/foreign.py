"""Backbone weights from other code bases -> this package's ``MaskedViT`` keys and config.

Accepted: a plain timm ``VisionTransformer`` state dict, the official DINO / iBOT ViTs (same
parameter names as timm), and full DINO / iBOT checkpoints (their ``teacher`` entry, with
``module.`` / ``backbone.`` prefixes). Classifier and projection heads are dropped. The
architecture is read off the tensors: width from the [cls] token, depth from the blocks,
patch size from the patch embedding, training resolution from the position embeddings; the
number of heads is the one of the ``ARCHS`` entry with that width and depth (heads leave no
trace in the weights).
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


def import_vit(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """timm/DINO/iBOT ViT tensors -> (``MaskedViT`` state dict, config dict for ``config_from_dict``)."""
    plain = {_strip(k): v for k, v in tensors.items()}
    plain = {k: v for k, v in plain.items() if not k.startswith(_DROPPED)}
    for required in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if required not in plain:
            raise DataError(f"{source}: no '{required}': not an ibot backbone nor a timm/DINO/iBOT ViT state dict")
    width = plain["cls_token"].shape[-1]
    depth = len({m.group(1) for k in plain if (m := re.match(r"blocks\.(\d+)\.", k))})
    arch = next((name for name, a in ARCHS.items() if a["embed_dim"] == width and a["depth"] == depth), None)
    if arch is None:
        known = ", ".join(f"{n} ({a['embed_dim']}x{a['depth']})" for n, a in ARCHS.items())
        raise DataError(f"{source}: a ViT of width {width} and depth {depth} is none of {known}")
    patch_size = plain["patch_embed.proj.weight"].shape[-1]
    side = math.isqrt(plain["pos_embed"].shape[1] - 1)
    if side * side != plain["pos_embed"].shape[1] - 1:
        raise DataError(f"{source}: pos_embed of {plain['pos_embed'].shape[1]} tokens is not 1 + a square grid")
    mask_token = plain.pop("masked_embed", None)  # iBOT's learned [mask] embedding, (1, D)
    state = {f"vit.{k}": v for k, v in plain.items()}
    # timm and DINO have no [mask] token; evaluation never masks, so zeros stand in.
    state["mask_token"] = (mask_token if mask_token is not None else torch.zeros(width)).reshape(1, 1, 1, width)
    config = {"model": {"arch": arch, "patch_size": patch_size}, "data": {"global_crop_size": side * patch_size}}
    return state, config
