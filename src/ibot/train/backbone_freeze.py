"""Continuing pre-training from a backbone: how long the backbone waits while fresh heads learn
(``optim.freeze_backbone_epochs``, "auto" resolved here) and how a step holds it still.

Random projection heads on a trained backbone send it large gradients that carry no information
yet, and what the backbone knew is lost before the heads have learned anything (users of DINOv2
report k-NN falling from 80 % to 10 %). While frozen, the student backbone's gradients are
dropped before the AdamW step (no update, no weight decay, no moments: ``clip_and_step``) and
the teacher's backbone takes no EMA (``IBOT.update_teacher``), so both stay bit for bit what they
started from; ``Schedules.backbone_lr`` then warms the backbone's learning rate up again.
"""

from __future__ import annotations

from typing import Any

import torch

from ibot.config import OptimConfig, RunPlan

AUTO = -1.0  # optim.freeze_backbone_epochs: frozen a while when model.init_from gives fresh heads
# The auto freeze in steps (the heads learn per step, whatever the dataset's size). Not the
# default: benchmarks/continue_pretraining.py from a CIFAR-10 backbone found it ending below
# fresh heads in 120- and 240-step runs (docs/init-from.md).
AUTO_FREEZE_STEPS = 300
# ... and at most this share of the steps planned at the start, so that a short run still trains its backbone.
AUTO_MAX_SHARE = 0.25


def freeze_backbone_steps(
    cfg: OptimConfig, plan: RunPlan, fresh_heads: bool, resumed_plan: dict[str, Any] | None
) -> int:
    """The steps the backbones stay frozen. ``fresh_heads``: ``model.init_from`` started the heads
    fresh; ``resumed_plan``: the checkpoint's plan of a resumed run (None for a new run), whose value
    is taken as it was resolved at the start, whatever the config says now: a resume has no
    ``init_from`` to ask, and a run started under another default must continue as it began."""
    if resumed_plan is not None and "freeze_backbone_steps" in resumed_plan:
        return int(resumed_plan["freeze_backbone_steps"])
    if cfg.freeze_backbone_epochs != AUTO:
        return int(round(cfg.freeze_backbone_epochs * plan.steps_per_epoch))
    if resumed_plan is not None:
        return 0  # a checkpoint from before the key: no freeze
    return min(AUTO_FREEZE_STEPS, int(AUTO_MAX_SHARE * plan.total_steps)) if fresh_heads else 0


def freeze_line(cfg: OptimConfig, frozen_steps: int, fresh_heads: bool, step: int) -> str:
    """The start line about the backbone's protection ("" when there is none to tell of)."""
    parts = []
    if frozen_steps > step:
        why = " while the fresh heads learn" if fresh_heads or cfg.freeze_backbone_epochs == AUTO else ""
        value = "auto" if cfg.freeze_backbone_epochs == AUTO else f"{cfg.freeze_backbone_epochs:g}"
        until = f"for {frozen_steps} step{'s' * (frozen_steps != 1)}" if step == 0 else f"until step {frozen_steps}"
        parts.append(f"backbone frozen {until}{why} (optim.freeze_backbone_epochs={value})")
    if cfg.backbone_lr_scale != 1:
        parts.append(f"backbone lr x {cfg.backbone_lr_scale:g} (optim.backbone_lr_scale)")
    if not parts:
        return ""
    return ("model.init_from: " if fresh_heads else "") + "; ".join(parts)


def skip_backbone_backward(optimizer: torch.optim.Optimizer, frozen: bool) -> None:
    """A frozen student backbone outside autograd: backward stops at the heads, the backbone's part
    of it is not computed. Only for an unwrapped model: DDP and FSDP expect a gradient for every
    parameter they were built with, so there the gradients are computed and dropped
    (``clip_and_step``). The parameters are the optimiser's backbone groups: what trains, and
    nothing else, is switched."""
    params = [p for g in optimizer.param_groups if g.get("is_backbone") for p in g["params"]]
    if params and params[0].requires_grad == frozen:
        for p in params:
            p.requires_grad_(not frozen)
