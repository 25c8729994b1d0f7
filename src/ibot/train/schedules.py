"""Per-step schedules as pure functions of the step (so a resumed run sees the same values)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ibot.config import Config, RunPlan


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


def budget_total_steps(step: int, minutes: float, budget_minutes: float) -> int:
    """Steps that fill ``budget_minutes`` at the average pace so far (``step`` steps in ``minutes``).

    At least ``step + 1`` while the budget is not spent (the pace may have picked up since the
    last estimate), and ``step`` once it is: the schedule is over.
    """
    if step <= 0 or minutes <= 0:
        raise ValueError(f"need a measured pace, got {step} steps in {minutes} minutes")
    return max(step + int(minutes < budget_minutes), round(step * budget_minutes / minutes))


@dataclass(frozen=True)
class Schedules:
    """Learning rate, weight decay, teacher momentum, temperature and KoLeo weight for any step."""

    cfg: Config
    plan: RunPlan

    def _steps(self, epochs: float) -> int:
        return int(round(epochs * self.plan.steps_per_epoch))

    def lr(self, step: int) -> float:
        o = self.cfg.optim
        return cosine_schedule(step, self.plan.total_steps, self.plan.lr, o.min_lr, self._steps(o.warmup_epochs))

    def weight_decay(self, step: int) -> float:
        o = self.cfg.optim
        return cosine_schedule(step, self.plan.total_steps, o.weight_decay, o.weight_decay_end)

    def teacher_momentum(self, step: int) -> float:
        o = self.cfg.optim
        return cosine_schedule(step, self.plan.total_steps, o.momentum_teacher, o.momentum_teacher_end)

    def teacher_temp(self, step: int) -> float:
        c = self.cfg.loss
        return linear_warmup(step, self._steps(c.warmup_teacher_temp_epochs), c.warmup_teacher_temp, c.teacher_temp)

    def koleo_weight(self, step: int) -> float:
        c = self.cfg.loss
        if c.koleo_schedule == "constant":
            return c.koleo_weight
        return cosine_schedule(step, self.plan.total_steps, c.koleo_weight, 0.0)

    def last_layer_frozen(self, step: int) -> bool:
        return step < self._steps(self.cfg.optim.freeze_last_layer_epochs)
