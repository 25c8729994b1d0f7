from __future__ import annotations

import math

import pytest

from ibot.config import RunPlan, load_config
from ibot.optim import cosine_schedule, linear_warmup
from ibot.train.schedules import Schedules, budget_total_steps


class TestCosineSchedule:
    def test_endpoints_and_midpoint(self) -> None:
        assert cosine_schedule(0, 101, 1.0, 0.0) == pytest.approx(1.0)
        assert cosine_schedule(50, 101, 1.0, 0.0) == pytest.approx(0.5)
        assert cosine_schedule(100, 101, 1.0, 0.0) == pytest.approx(0.0)
        assert cosine_schedule(500, 101, 1.0, 0.2) == pytest.approx(0.2)  # clamped past the end

    def test_linear_warmup_then_cosine(self) -> None:
        assert cosine_schedule(0, 110, 2.0, 0.0, warmup_steps=10) == 0.0
        assert cosine_schedule(5, 110, 2.0, 0.0, warmup_steps=10) == pytest.approx(1.0)
        assert cosine_schedule(10, 110, 2.0, 0.0, warmup_steps=10) == pytest.approx(2.0)
        # a quarter of the way through the decay: 0.5 * (1 + cos(pi / 4)) * 2
        expected = 0.5 * (1 + math.cos(math.pi * 0.25)) * 2.0
        assert cosine_schedule(10 + 99 // 4, 110, 2.0, 0.0, warmup_steps=10) == pytest.approx(expected, rel=0.02)


def test_linear_warmup() -> None:
    assert linear_warmup(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(30, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup(1000, 30, 0.04, 0.07) == pytest.approx(0.07)


def test_run_schedules_at_chosen_steps() -> None:
    # A global batch of 128, not 256: the peak is half of optim.lr (linear scaling rule), so a
    # schedule that forgot the scaled rate (RunPlan.lr) would be caught.
    cfg = load_config(
        None,
        [
            "data.batch_size=128",
            "optim.lr=1e-3",
            "optim.min_lr=0",
            "optim.epochs=10",
            "optim.warmup_epochs=2",
            "optim.freeze_last_layer_epochs=1",
            "loss.warmup_teacher_temp_epochs=3",
        ],
    )
    s = Schedules(cfg, RunPlan.derive(cfg, dataset_size=1280))  # 10 steps per epoch, 100 steps
    peak = 1e-3 * 128 / 256
    assert s.lr(0) == 0.0 and s.lr(10) == pytest.approx(peak / 2) and s.lr(20) == pytest.approx(peak)
    assert s.lr(99) == pytest.approx(0.0, abs=1e-12)
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(99) == pytest.approx(0.4)
    assert s.teacher_momentum(0) == pytest.approx(0.996) and s.teacher_momentum(99) == pytest.approx(1.0)
    assert s.teacher_temp(0) == pytest.approx(0.04) and s.teacher_temp(15) == pytest.approx(0.055)
    assert s.teacher_temp(30) == pytest.approx(0.07) and s.teacher_temp(90) == pytest.approx(0.07)
    assert s.last_layer_frozen(9) and not s.last_layer_frozen(10)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_koleo_weight_schedule(schedule: str) -> None:
    cfg = load_config(
        None, ["data.batch_size=256", "optim.epochs=10", "loss.koleo_weight=0.1", f"loss.koleo_schedule={schedule}"]
    )
    s = Schedules(cfg, RunPlan.derive(cfg, dataset_size=2560))  # 100 steps
    assert s.koleo_weight(0) == pytest.approx(0.1)
    middle, last = (0.1, 0.1) if schedule == "constant" else (0.05, 0.0)
    assert s.koleo_weight(round(99 / 2)) == pytest.approx(middle, abs=2e-3)
    assert s.koleo_weight(99) == pytest.approx(last, abs=1e-12)


def test_budget_total_steps_from_the_pace_so_far() -> None:
    assert budget_total_steps(100, 10.0, 60.0) == 600  # 10 steps a minute for 60 minutes
    assert budget_total_steps(100, 75.0, 60.0) == 100  # budget spent: the schedule ends here
    assert budget_total_steps(100, 59.9, 60.0) == 101  # not spent yet: never ends at this step
    with pytest.raises(ValueError, match="pace"):
        budget_total_steps(0, 0.0, 60.0)
