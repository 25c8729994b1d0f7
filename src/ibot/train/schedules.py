"""Per-step schedules as pure functions of the step (so a resumed run sees the same values)."""

from __future__ import annotations

from dataclasses import dataclass

from ibot.config import Config, RunPlan
from ibot.optim import cosine_schedule, linear_warmup


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

    def backbone_frozen(self, step: int) -> bool:
        """Whether the backbones wait at ``step`` while the heads learn (``RunPlan.freeze_backbone_steps``)."""
        return step < self.plan.freeze_backbone_steps

    def backbone_lr(self, step: int) -> float:
        """The backbone's learning rate: 0 while frozen, then warmed up again from 0 over
        ``optim.warmup_epochs`` (its AdamW moments start then: a first step at the full rate would
        move every weight by about the rate at once), times ``optim.backbone_lr_scale``."""
        frozen = self.plan.freeze_backbone_steps
        if step < frozen:
            return 0.0
        o = self.cfg.optim
        rewarm = self._steps(o.warmup_epochs) if frozen else 0
        ramp = (step - frozen) / rewarm if step < frozen + rewarm else 1.0
        return self.lr(step) * o.backbone_lr_scale * ramp
