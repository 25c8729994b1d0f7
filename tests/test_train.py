"""System tests: tiny end-to-end runs on CPU in seconds."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ibot.config import Config, load_config
from ibot.errors import ConfigError
from ibot.models.reader import read_backbone
from ibot.storage import CHECKPOINT_NAME, TEACHER_NAME, load_checkpoint
from ibot.train.loop import train
from ibot.train.metrics import read_metrics

from conftest import tiny_overrides


def _with(cfg: Config, **train_fields: object) -> Config:
    return replace(cfg, train=replace(cfg.train, **train_fields))


def test_tiny_run_gives_finite_losses_and_checkpoints(tiny_config: Config) -> None:
    result = train(tiny_config, progress=False)
    out = Path(tiny_config.train.output_dir)
    assert result.step == result.total_steps == 8  # 16 images / batch 4 * 2 epochs
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_patch"]) for r in rows)
    assert all(0 <= r["data_wait_share"] <= 1 for r in rows)  # the real loader, decoding in this process
    state = load_checkpoint(out / CHECKPOINT_NAME)  # weights_only=True under the hood
    assert state["step"] == 8 and "cls_center.center" in state["method"]
    tensors, config = read_backbone(out / TEACHER_NAME)
    assert config["model"]["arch"] == "vit_pico" and "mask_token" in tensors
    teacher = {
        k.removeprefix("teacher.backbone."): v for k, v in state["method"].items() if k.startswith("teacher.backbone.")
    }
    assert all(torch.equal(tensors[k], teacher[k]) for k in tensors)


def test_training_moves_the_student_and_the_teacher_follows(tiny_config: Config) -> None:
    torch.manual_seed(0)  # the loop seeds with train.seed (0) before it builds the same IBOT
    from ibot.method import IBOT

    init = IBOT(tiny_config.model, tiny_config.loss, 16).state_dict()
    # The prototype layer is frozen for optim.freeze_last_layer_epochs: stop inside the freeze
    # (its last step), then resume to the end of the run.
    frozen_steps = int(tiny_config.optim.freeze_last_layer_epochs * 16 // tiny_config.data.batch_size)
    assert frozen_steps == 4  # 16 images / batch 4, one epoch: the run's first half
    train(_with(tiny_config, max_steps=frozen_steps), progress=False)
    frozen = load_checkpoint(Path(tiny_config.train.output_dir) / CHECKPOINT_NAME)["method"]
    train(tiny_config, resume=True, progress=False)
    final = load_checkpoint(Path(tiny_config.train.output_dir) / CHECKPOINT_NAME)["method"]
    key = "blocks.0.attn.qkv.weight"
    for state in (frozen, final):
        assert not torch.equal(init[f"student.backbone.vit.{key}"], state[f"student.backbone.vit.{key}"])
        assert not torch.equal(init[f"teacher.backbone.vit.{key}"], state[f"teacher.backbone.vit.{key}"])
    # Untouched through the frozen steps (no gradient step, no weight decay, so the teacher's
    # EMA of it stays put too), then trained.
    prototypes = "head.last_layer.parametrizations.weight.original1"
    for branch in ("student", "teacher"):
        assert torch.equal(init[f"{branch}.{prototypes}"], frozen[f"{branch}.{prototypes}"]), branch
    assert not torch.equal(frozen[f"student.{prototypes}"], final[f"student.{prototypes}"])
    assert not torch.equal(frozen[f"teacher.{prototypes}"], final[f"teacher.{prototypes}"])


@pytest.mark.parametrize("workers, pipeline", [(0, "pil"), (2, "pil"), (2, "device")])
def test_resume_is_exact(image_folder: Path, tmp_path: Path, workers: int, pipeline: str) -> None:
    """8 steps == 3 steps, stop, resume, 5 steps: same schedules, losses and bit-identical weights."""
    extra = [f"data.num_workers={workers}", f"data.pipeline={pipeline}"]
    full_cfg = load_config(None, tiny_overrides(image_folder, tmp_path / "full") + extra)
    part_cfg = load_config(None, tiny_overrides(image_folder, tmp_path / "part") + extra)
    train(full_cfg, progress=False)
    stopped = train(_with(part_cfg, max_steps=3), progress=False)
    assert stopped.step == 3
    assert load_checkpoint(tmp_path / "part" / CHECKPOINT_NAME)["step"] == 3
    resumed = train(part_cfg, resume=True, progress=False)
    assert resumed.step == 8

    full_rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part_rows = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in part_rows] == list(range(1, 9))  # resumed at step 4, not 1
    for a, b in zip(full_rows, part_rows):
        for key in ("lr", "weight_decay", "teacher_momentum", "teacher_temp"):
            assert a[key] == pytest.approx(b[key], rel=1e-12)
        assert a["loss"] == b["loss"]
    full = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)
    part = load_checkpoint(tmp_path / "part" / CHECKPOINT_NAME)
    for k in full["method"]:
        assert torch.equal(full["method"][k], part["method"][k]), k
    exp_avg = [s["exp_avg"] for s in full["optimizer"]["state"].values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(exp_avg, part["optimizer"]["state"].values()))


def test_resume_continues_the_training_clock(image_folder: Path, tmp_path: Path) -> None:
    from ibot.train.checkpoint import save_checkpoint

    cfg = load_config(None, tiny_overrides(image_folder, tmp_path / "run"))
    train(_with(cfg, max_steps=2), progress=False)
    path = tmp_path / "run" / CHECKPOINT_NAME
    state = load_checkpoint(path)
    assert 0 < state["train_minutes"] < 5
    # As if the first part had trained 30 min; written into the step file that checkpoint.pt links.
    save_checkpoint(path.resolve(), {**state, "train_minutes": 30.0})
    resumed = train(cfg, resume=True, progress=False)
    assert 30.0 < resumed.train_minutes < 35.0
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["train_minutes"] > 30.0


def test_budget_fits_the_schedule_to_the_time(tiny_config: Config) -> None:
    """Schedules span ``train.budget_minutes`` of training, not ``optim.epochs`` (an unreachable 40,000 steps).

    Speed-independent: the run ends within one step of the budget however slow or fast the steps.
    """
    cfg = replace(tiny_config, optim=replace(tiny_config.optim, epochs=10_000))
    result = train(_with(cfg, budget_minutes=0.05), progress=False)
    assert result.step == result.total_steps < 40_000
    rows = read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")
    minutes = [r["train_minutes"] for r in rows]
    longest_step = max(b - a for a, b in zip(minutes, minutes[1:]))
    assert 0.05 <= result.train_minutes <= 0.05 + 2 * longest_step  # log_every=1: read at every step
    peak = max(r["lr"] for r in rows)
    floor = cfg.optim.min_lr
    assert rows[-1]["lr"] < floor + 0.1 * (peak - floor)  # the cosine ran to (nearly) its end in the budget
    assert rows[-1]["teacher_momentum"] > 0.999


def test_a_budget_counts_training_steps_not_building_the_monitor(
    tiny_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a clock injected into the loop: building the k-NN monitor takes 10 minutes, each step 1 s;
    a 0.5-minute budget is 30 steps, whatever the log cadence (``ibot ablate --budget 0.1m`` ran
    10 to 65 steps over)."""
    from types import SimpleNamespace

    import ibot.train.loop as loop
    from ibot.data.skips import SkipLog

    now = [0.0]
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: now[0]))
    real_step = loop._train_step

    def one_second_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        now[0] += 1.0
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", one_second_step)

    class SlowToBuild:
        skips = SkipLog()

        def __init__(self, cfg: Config, run: object) -> None:
            now[0] += 600.0  # decoding the monitor's images

        def __call__(self, backbone: torch.nn.Module) -> dict[str, float]:
            return {"knn_top1": 0.0}

    cfg = replace(tiny_config, optim=replace(tiny_config.optim, epochs=1000))
    cfg = replace(cfg, eval=replace(cfg.eval, monitor_every_minutes=100.0))
    result = train(_with(cfg, budget_minutes=0.5, log_every=10), progress=False, monitor=SlowToBuild)
    assert result.step in (30, 31) and result.total_steps == result.step


def test_resume_refuses_a_different_model(image_folder: Path, tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(image_folder, tmp_path / "run") + ["train.max_steps=1"])
    train(cfg, progress=False)
    other = replace(cfg, model=replace(cfg.model, out_dim=64))
    with pytest.raises(ConfigError, match="different model"):
        train(other, resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_config: Config) -> None:
    from ibot.errors import NonFiniteLossError

    cfg = _with(tiny_config, max_steps=2)
    train(cfg, progress=False)
    ckpt = Path(cfg.train.output_dir) / CHECKPOINT_NAME
    good = ckpt.read_bytes()
    bad = replace(tiny_config, optim=replace(tiny_config.optim, lr=float("inf")))
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train(bad, resume=True, progress=False)
    assert ckpt.read_bytes() == good
