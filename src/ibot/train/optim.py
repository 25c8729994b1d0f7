"""Pre-training's optimiser: AdamW over the student's parameter groups, and the per-step update."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ibot.config import OptimConfig
from ibot.method import IBOT
from ibot.optim import adamw


def build_optimizer(method: IBOT, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """Pre-training's AdamW over the student's groups; lr and wd are set every step."""
    return adamw(method.param_groups(), device, lr=0.0, betas=cfg.betas, weight_decay=0.0)


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group["apply_wd"] else 0.0


def clip_and_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    param_sets: list[list[nn.Parameter]],
    clip_grad: float,
    freeze_last_layer: bool,
) -> torch.Tensor | None:
    """Unscale, drop last-layer grads while frozen, clip, step; returns the largest pre-clip norm.

    Clipping is on the total norm of each sub-module (backbone, each head) as in DINOv2: one
    fused norm per module instead of iBOT's per-tensor clipping with a host sync per tensor.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    if freeze_last_layer:
        # grad None (not zero) so AdamW skips these tensors entirely, as in DINO/iBOT.
        for group in optimizer.param_groups:
            if group["is_last_layer"]:
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
