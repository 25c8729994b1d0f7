"""AdamW and the warm-up + cosine schedule: the optimiser pieces that pre-training, the probes and fine-tuning share."""

from __future__ import annotations

import math
from typing import Any

import torch


def adamw(param_groups: list[dict[str, Any]], device: torch.device, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW, fused where PyTorch has the kernel (CPU, CUDA), else multi-tensor.

    The fused kernel updates each tensor in one pass: on the CPU it is several times faster than
    the multi-tensor path and does not allocate a parameter-sized temporary (the foreach path's
    ``sqrt(exp_avg_sq)``), which is part of the step's peak memory.
    """
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups, foreach=not fused, fused=fused, **kwargs)


def cosine_schedule(
    step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine to ``final``.

    ``step`` 0 gives ``warmup_start`` (or ``base`` without warm-up); ``total_steps - 1`` gives ``final``.
    """
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start`` -> ``end`` linearly over ``warmup_steps``, then ``end``."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
