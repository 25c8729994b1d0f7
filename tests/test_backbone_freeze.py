"""Continuing pre-training from a backbone: ``optim.freeze_backbone_epochs`` (off by default; -1,
auto: frozen a while when ``model.init_from`` gives fresh heads) and ``optim.backbone_lr_scale``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ibot.config import Config, RunPlan, load_config
from ibot.errors import ConfigError
from ibot.method import IBOT
from ibot.optim import adamw
from ibot.storage import CHECKPOINT_NAME, TEACHER_NAME, load_checkpoint
from ibot.train import backbone_freeze
from ibot.train.backbone_freeze import AUTO_FREEZE_STEPS, freeze_backbone_steps
from ibot.train.loop import train
from ibot.train.metrics import read_metrics
from ibot.train.optim import clip_and_step, upgrade_optimizer_state

from conftest import tiny_overrides

# tiny_overrides: 16 images, batch 4 -> 4 steps per epoch, 8 steps in the run.


def _config(images: Path, out: Path, *extra: str) -> Config:
    return load_config(None, [*tiny_overrides(images, out), *extra])


def _branch(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def source(image_folder: Path, tmp_path: Path) -> Path:
    """A trained run folder: its student and teacher backbones differ (3 steps of EMA)."""
    train(_config(image_folder, tmp_path / "source", "train.max_steps=3", "optim.warmup_epochs=0"), progress=False)
    return tmp_path / "source"


@pytest.mark.parametrize("file", [CHECKPOINT_NAME, TEACHER_NAME])
def test_frozen_backbones_stay_bit_identical_while_the_heads_learn(
    source: Path, image_folder: Path, tmp_path: Path, file: str
) -> None:
    # checkpoint.pt with another out_dim: its heads do not fit, and its student and teacher
    # backbones differ (the teacher's EMA must not pull its backbone towards the student's);
    # teacher.safetensors: one backbone for both branches.
    common = [
        f"model.init_from={source / file}",
        "model.out_dim=24",
        "optim.freeze_backbone_epochs=1",  # 4 steps, then 4 more (optim.warmup_epochs=1: 4 steps)
        "optim.freeze_last_layer_epochs=0",
    ]
    cfg = _config(image_folder, tmp_path / "run", *common, "train.max_steps=4")
    torch.manual_seed(cfg.train.seed)  # the loop seeds with train.seed before it builds the same IBOT
    heads_before = _branch(IBOT(cfg.model, cfg.loss, 16, cfg.mim).state_dict(), "student.head.")
    train(cfg, progress=False)
    after = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert after["plan"]["freeze_backbone_steps"] == 4
    loaded = load_checkpoint(source / CHECKPOINT_NAME)["method"]
    for branch in ("student", "teacher"):
        want = _branch(loaded, f"{'teacher' if file == TEACHER_NAME else branch}.backbone.")
        assert _same(_branch(after["method"], f"{branch}.backbone."), want), branch
        heads = _branch(after["method"], f"{branch}.head.")
        assert not any(torch.equal(heads[k], heads_before[k]) for k in heads if k.endswith("weight")), branch
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["backbone_lr"] for r in rows] == [0.0] * 4 and rows[-1]["lr"] > 0
    # Nothing of the frozen steps in AdamW's state: the backbone's moments start when it thaws.
    backbone_groups = [g for g in after["optimizer"]["param_groups"] if g["is_backbone"]]
    assert backbone_groups and not any(i in after["optimizer"]["state"] for g in backbone_groups for i in g["params"])

    # Thawed: its lr warms up again from 0 over optim.warmup_epochs, and it trains.
    train(_config(image_folder, tmp_path / "run", *common), resume=True, progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["backbone_lr"] / r["lr"] for r in rows[4:8]] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    final = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["method"]
    for branch in ("student", "teacher"):
        assert not _same(_branch(final, f"{branch}.backbone."), _branch(after["method"], f"{branch}.backbone."))


def test_auto_freezes_only_when_init_from_gives_fresh_heads(
    source: Path, image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    auto = "optim.freeze_backbone_epochs=-1"
    cases = {
        "fresh": (f"model.init_from={source / TEACHER_NAME}", auto),  # a backbone alone
        "heads": (f"model.init_from={source}", auto),  # the source's checkpoint: its heads fit
        "none": (auto,),
        "default": (f"model.init_from={source / TEACHER_NAME}",),  # off unless asked for (measured)
    }
    frozen = {}
    for name, extra in cases.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ibot.train.loop"):
            train(_config(image_folder, tmp_path / name, "train.max_steps=1", *extra), progress=False)
        frozen[name] = load_checkpoint(tmp_path / name / CHECKPOINT_NAME)["plan"]["freeze_backbone_steps"]
        lines = [m for m in caplog.messages if "backbone frozen" in m]
        if name == "fresh":
            # min(AUTO_FREEZE_STEPS, a quarter of the 8 planned steps)
            assert lines == [
                "model.init_from: backbone frozen for 2 steps while the fresh heads learn "
                "(optim.freeze_backbone_epochs=auto)"
            ]
        else:
            assert lines == []
    assert frozen == {"fresh": 2, "heads": 0, "none": 0, "default": 0}


def test_auto_resolution() -> None:
    cfg = load_config(None, ["optim.freeze_backbone_epochs=-1"]).optim
    plan = RunPlan(global_batch_size=64, steps_per_epoch=781, total_steps=100_000, lr=1e-3)
    assert freeze_backbone_steps(load_config(None, []).optim, plan, fresh_heads=True, resumed_plan=None) == 0
    assert freeze_backbone_steps(cfg, plan, fresh_heads=True, resumed_plan=None) == AUTO_FREEZE_STEPS
    assert freeze_backbone_steps(cfg, plan, fresh_heads=False, resumed_plan=None) == 0
    # A resume takes what the run resolved at its start (it has no init_from to ask) ...
    assert freeze_backbone_steps(cfg, plan, fresh_heads=False, resumed_plan={"freeze_backbone_steps": 7}) == 7
    assert freeze_backbone_steps(cfg, plan, fresh_heads=False, resumed_plan={}) == 0  # a checkpoint before it
    # ... and an explicit value is epochs of the plan, whatever the heads, for a new run; a resumed
    # one keeps what its start resolved (a run begun under the auto default continues frozen).
    explicit = load_config(None, ["optim.freeze_backbone_epochs=0.5"]).optim
    assert freeze_backbone_steps(explicit, plan, fresh_heads=False, resumed_plan=None) == 390
    assert freeze_backbone_steps(explicit, plan, fresh_heads=False, resumed_plan={"freeze_backbone_steps": 7}) == 7
    default = load_config(None, []).optim
    assert freeze_backbone_steps(default, plan, fresh_heads=False, resumed_plan={"freeze_backbone_steps": 7}) == 7
    assert freeze_backbone_steps(explicit, plan, fresh_heads=False, resumed_plan={}) == 390


def test_resume_inside_the_auto_freeze_is_exact(source: Path, image_folder: Path, tmp_path: Path) -> None:
    """8 steps == 1 step, stop, resume, 7 steps, with the auto freeze (2 steps) resolved from init_from."""
    init = f"model.init_from={source / TEACHER_NAME}", "optim.freeze_backbone_epochs=-1"
    train(_config(image_folder, tmp_path / "full", *init), progress=False)
    train(_config(image_folder, tmp_path / "part", *init, "train.max_steps=1"), progress=False)
    train(_config(image_folder, tmp_path / "part", *init), resume=True, progress=False)
    full = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)
    part = load_checkpoint(tmp_path / "part" / CHECKPOINT_NAME)
    assert full["plan"] == part["plan"] and part["plan"]["freeze_backbone_steps"] == 2
    full_rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part_rows = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["backbone_lr"] for r in part_rows] == [r["backbone_lr"] for r in full_rows]
    assert [r["loss"] for r in part_rows] == [r["loss"] for r in full_rows]
    for k in full["method"]:
        assert torch.equal(full["method"][k], part["method"][k]), k


def test_dropped_gradients_give_what_skipping_the_backward_gives(
    source: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DDP / FSDP the frozen backbone's gradients are computed and dropped; alone, its backward
    is skipped. Both paths train the same run, bit for bit."""
    extra = (f"model.init_from={source / TEACHER_NAME}", "optim.freeze_backbone_epochs=1", "optim.warmup_epochs=0")
    train(_config(image_folder, tmp_path / "skipped", *extra), progress=False)
    calls = []
    monkeypatch.setattr("ibot.train.loop.skip_backbone_backward", lambda *args: calls.append(args))
    train(_config(image_folder, tmp_path / "dropped", *extra), progress=False)
    assert len(calls) == 8
    skipped = load_checkpoint(tmp_path / "skipped" / CHECKPOINT_NAME)
    dropped = load_checkpoint(tmp_path / "dropped" / CHECKPOINT_NAME)
    for k in skipped["method"]:
        assert torch.equal(skipped["method"][k], dropped["method"][k]), k


def test_skipping_the_backward_leaves_frozen_what_was_frozen(tiny_config: Config) -> None:
    method = IBOT(tiny_config.model, tiny_config.loss, 16)
    optimizer = adamw(method.param_groups(), torch.device("cpu"), lr=1e-3)
    fixed = method.student["head"].last_layer.parametrizations.weight.original0  # norm_last_layer: never trains
    backbone_freeze.skip_backbone_backward(optimizer, frozen=True)
    assert not any(p.requires_grad for p in method.student["backbone"].parameters())
    assert all(p.requires_grad for n, p in method.student["head"].named_parameters() if "original0" not in n)
    backbone_freeze.skip_backbone_backward(optimizer, frozen=False)
    assert all(p.requires_grad for p in method.student["backbone"].parameters())
    assert not fixed.requires_grad


def test_clip_and_step_drops_the_backbone_gradients(tiny_config: Config) -> None:
    torch.manual_seed(0)
    method = IBOT(tiny_config.model, tiny_config.loss, 16)
    optimizer = adamw(method.param_groups(), torch.device("cpu"), lr=1e-2, weight_decay=0.1)
    before = {k: v.clone() for k, v in method.student.state_dict().items()}
    for p in method.student.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    sets = [list(m.parameters()) for m in method.student.values()]
    clip_and_step(optimizer, None, sets, 3.0, freeze_last_layer=False, freeze_backbone=True)
    after = method.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["head.mlp.0.weight"], after["head.mlp.0.weight"])
    assert not any(p in optimizer.state for p in method.student["backbone"].parameters())


def test_backbone_lr_scale_scales_the_backbone_step_alone(image_folder: Path, tmp_path: Path) -> None:
    # One step from the same start at the full rate: AdamW's first update (and its decoupled weight
    # decay) is proportional to the rate, so the backbone moves half as far and the heads as far.
    moved = {}
    for scale in (1.0, 0.5):
        out = tmp_path / f"scale{scale}"
        scaled = f"optim.backbone_lr_scale={scale}"
        cfg = _config(image_folder, out, scaled, "optim.warmup_epochs=0", "train.max_steps=1")
        train(cfg, progress=False)
        row = read_metrics(out / "metrics.jsonl")[0]
        assert row["backbone_lr"] == pytest.approx(scale * row["lr"], rel=1e-12)
        moved[scale] = load_checkpoint(out / CHECKPOINT_NAME)["method"]
    torch.manual_seed(cfg.train.seed)  # the loop's start
    start = IBOT(cfg.model, cfg.loss, 16, cfg.mim).state_dict()
    for key, ratio in (("student.backbone.vit.blocks.0.attn.qkv.weight", 0.5), ("student.head.mlp.0.weight", 1.0)):
        full, half = (moved[s][key] - start[key] for s in (1.0, 0.5))
        assert full.abs().max() > 0
        assert torch.allclose(half, ratio * full, rtol=1e-2, atol=2e-8), key  # fp32 rounding of p + d


def test_checkpoints_before_the_backbone_groups_resume(tiny_config: Config) -> None:
    """AdamW state written with the groups of before (no ``is_backbone``) is re-keyed to today's:
    every parameter gets its own moments back, and the next step is the same."""
    torch.manual_seed(0)
    method = IBOT(tiny_config.model, tiny_config.loss, 16)
    old = adamw(method.param_groups(split_backbone=False), torch.device("cpu"), lr=1e-2, weight_decay=0.1)
    new = adamw(method.param_groups(), torch.device("cpu"), lr=1e-2, weight_decay=0.1)
    last_layer = method.student["head"].last_layer.parametrizations.weight.original1
    for _ in range(2):
        for p in method.student.parameters():  # the last layer frozen: no grad, no state, as in epoch 1
            p.grad = torch.randn_like(p) if p.requires_grad and p is not last_layer else None
        old.step()
    saved = old.state_dict()
    assert "is_backbone" not in saved["param_groups"][0]
    new.load_state_dict(upgrade_optimizer_state(saved, method))
    assert {id(p) for p in new.state} == {id(p) for p in old.state} and last_layer not in new.state
    for p, state in old.state.items():
        assert all(torch.equal(v, new.state[p][k]) for k, v in state.items())
    assert upgrade_optimizer_state(new.state_dict(), method) == new.state_dict()  # today's: as it is

    # FSDP's full state names the parameters: the names stay, the groups are today's.
    name_of = {id(p): f"student.{n}" for n, p in method.student.named_parameters()}
    before = [p for g in method.param_groups(split_backbone=False) for p in g["params"]]
    by_index = dict(zip(range(len(before)), (name_of[id(p)] for p in before)))
    named = {
        "state": {by_index[i]: v for i, v in saved["state"].items()},
        "param_groups": [{**g, "params": [by_index[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    upgraded = upgrade_optimizer_state(named, method)
    assert upgraded["state"] is named["state"]
    today = method.param_groups()
    assert [g["params"] for g in upgraded["param_groups"]] == [[name_of[id(p)] for p in g["params"]] for g in today]
    assert [g["is_backbone"] for g in upgraded["param_groups"]] == [g["is_backbone"] for g in today]
    assert all(g["betas"] == saved["param_groups"][0]["betas"] for g in upgraded["param_groups"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.freeze_backbone_epochs=-2", "optim.freeze_backbone_epochs: must be >= 0, or -1"),
        ("optim.backbone_lr_scale=0", "optim.backbone_lr_scale: must be > 0"),
    ],
)
def test_bad_values_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
