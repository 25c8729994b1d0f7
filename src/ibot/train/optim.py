"""Pre-training's optimiser: AdamW over the student's parameter groups, and the per-step update."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ibot.config import OptimConfig
from ibot.method import IBOT
from ibot.optim import adamw


def build_optimizer(method: IBOT, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """Pre-training's AdamW over the student's groups; lr and wd are set every step."""
    return adamw(method.param_groups(), device, lr=0.0, betas=cfg.betas, weight_decay=0.0)


def set_lr_wd(
    optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, backbone_lr: float | None = None
) -> None:
    """This step's rates: ``lr`` for the heads, ``backbone_lr`` (None: ``lr``) for the backbone."""
    for group in optimizer.param_groups:
        group["lr"] = backbone_lr if backbone_lr is not None and group.get("is_backbone") else lr
        group["weight_decay"] = weight_decay if group["apply_wd"] else 0.0


def upgrade_optimizer_state(saved: dict[str, Any], method: IBOT) -> dict[str, Any]:
    """A checkpoint's AdamW state as today's groups hold it: one written before the backbone had
    groups of its own (no ``is_backbone`` key) is re-keyed, parameter by parameter, to them.

    Both layouts of ``_save``: a plain optimizer's (parameters as indices) and FSDP's full state
    (parameters as names); a state that fits neither is returned as it is, for torch to refuse.
    """
    groups = saved["param_groups"]
    if not groups or "is_backbone" in groups[0]:
        return saved
    keys = [k for g in groups for k in g["params"]]
    if keys and isinstance(keys[0], str):  # FSDP: names, which stay
        name_of = {id(p): f"student.{n}" for n, p in method.student.named_parameters()}
        key_of = {id(p): name_of[id(p)] for g in method.param_groups() for p in g["params"]}
        if set(key_of.values()) != set(keys):
            return saved
        state = saved["state"]
    else:  # indices: the order of the groups of before, renumbered in today's
        before = [p for g in method.param_groups(split_backbone=False) for p in g["params"]]
        if len(before) != len(keys):
            return saved
        old_index = {id(p): k for p, k in zip(before, keys)}
        today = [p for g in method.param_groups() for p in g["params"]]
        key_of = {id(p): i for i, p in enumerate(today)}
        # A parameter without state (a last layer still frozen) stays without.
        state = {key_of[id(p)]: saved["state"][old_index[id(p)]] for p in today if old_index[id(p)] in saved["state"]}
    new_groups = []
    for group in method.param_groups():
        kind = (group["apply_wd"], group["is_last_layer"])
        old = next(g for g in groups if (g["apply_wd"], g["is_last_layer"]) == kind)
        params = [key_of[id(p)] for p in group["params"]]
        new_groups.append({**old, "is_backbone": group["is_backbone"], "params": params})
    return {"state": state, "param_groups": new_groups}


def clip_and_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    param_sets: list[list[nn.Parameter]],
    clip_grad: float,
    freeze_last_layer: bool,
    freeze_backbone: bool = False,
) -> torch.Tensor | None:
    """Unscale, drop last-layer / backbone grads while frozen, clip, step; returns the largest pre-clip norm.

    Clipping is on the total norm of each sub-module (backbone, each head) as in DINOv2: one
    fused norm per module instead of iBOT's per-tensor clipping with a host sync per tensor.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    # grad None (not zero) so AdamW skips these tensors entirely (no step, no weight decay, no
    # moment update), as DINO/iBOT freeze the last layer.
    for group in optimizer.param_groups:
        if (freeze_last_layer and group["is_last_layer"]) or (freeze_backbone and group.get("is_backbone")):
            for p in group["params"]:
                p.grad = None
    norm = None
    if clip_grad > 0:
        norms = []
        for params in param_sets:
            with_grad = [p for p in params if p.grad is not None]
            if with_grad:
                set_norm = torch.nn.utils.clip_grad_norm_(with_grad, clip_grad, foreach=True)
                # Under FSDP the norm is a replicated DTensor; the max below wants a plain tensor.
                norms.append(set_norm.full_tensor() if isinstance(set_norm, DTensor) else set_norm)
        norm = torch.stack(norms).max() if norms else None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
