"""``ibot distill``: a frozen teacher from a file teaches a smaller ViT; tiny runs on the CPU."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from ibot.cli import main
from ibot.config import Config, load_config
from ibot.distill_method import Distill, resize_patches
from ibot.errors import ConfigError, DataError
from ibot.models.reader import read_backbone
from ibot.models.teacher_file import read_teacher
from ibot.models.vit import MaskedViT
from ibot.storage import CHECKPOINT_NAME, TEACHER_NAME, load_checkpoint, save_backbone
from ibot.train import loop
from ibot.train.loop import train
from ibot.train.metrics import read_metrics

from conftest import make_image_folder, tiny_overrides


def save_teacher(path: Path, *overrides: str, seed: int = 1, in_chans: int = 3) -> Path:
    """A backbone alone in a ``teacher.safetensors`` (its config in the metadata), default 192 x 1 /4."""
    cfg = load_config(None, ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=4", *overrides])
    torch.manual_seed(seed)
    backbone = MaskedViT.from_config(cfg.model, 16, in_chans)
    save_backbone(path, backbone.state_dict(), cfg.to_dict())
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("distill") / "images")


@pytest.fixture(scope="module")
def backbone_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / TEACHER_NAME)


@pytest.fixture(scope="module")
def heads_teacher(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pre-training run's folder: its checkpoint holds the teacher's projection head."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    train(load_config(None, tiny_overrides(images, run)), progress=False)
    return run


def distill_config(images: Path, out: Path, teacher: Path, *extra: str) -> Config:
    """A pico student (48 x 1, the smallest width) of ``teacher``."""
    return load_config(None, [*tiny_overrides(images, out), "model.depth=1", f"distill.teacher={teacher}", *extra])


def _captured_method(monkeypatch: pytest.MonkeyPatch) -> list[Distill]:
    """The ``Distill`` the loop builds, kept for the test to look at."""
    built: list[Distill] = []
    original = Distill.from_config

    def keep(cfg: Config) -> Distill:
        built.append(original(cfg))
        return built[-1]

    monkeypatch.setattr(loop.Distill, "from_config", staticmethod(keep))
    return built


@pytest.mark.parametrize("objective", ["regression", "prototypes"])
def test_a_run_trains_the_student_and_leaves_the_teacher_as_read(
    images: Path,
    tmp_path: Path,
    backbone_teacher: Path,
    heads_teacher: Path,
    objective: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    teacher_path = backbone_teacher if objective == "regression" else heads_teacher
    cfg = distill_config(images, tmp_path / "run", teacher_path, "loss.koleo_weight=0.1")
    built = _captured_method(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ibot"):
        result = train(cfg, progress=False)
    assert result.step == 8
    method = built[0]
    assert method.objective == objective  # distill.objective=auto: heads in the file -> prototypes
    start = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("distill: teacher"))
    assert f"objective {objective}" in start and "student 48 x 1, patch 4" in start
    # The teacher is bit for bit the file's, in eval mode, without gradients.
    fresh = read_teacher(teacher_path, 16, 3)
    assert not method.teacher.training and not any(p.requires_grad for p in method.teacher.parameters())
    fresh_state = {"backbone." + k: v for k, v in fresh.backbone.state_dict().items()}
    fresh_state |= {f"{n}.{k}": v for n, h in fresh.heads.items() for k, v in h.state_dict().items()}
    assert fresh_state.keys() == method.teacher.state_dict().keys()
    assert all(torch.equal(v, method.teacher.state_dict()[k]) for k, v in fresh_state.items())
    # The checkpoint holds the student (and what trains with it), not the teacher; the run's
    # backbone file is the student's, with the run's config (whose model is the student).
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["method"]
    assert not any(k.startswith("teacher.") for k in state)
    assert state["_extra_state"]["objective"] == objective
    tensors, config = read_backbone(tmp_path / "run")
    assert config["model"]["depth"] == 1 and config["distill"]["teacher"] == str(teacher_path)
    assert all(torch.equal(v, state[f"student.backbone.{k}"]) for k, v in tensors.items())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(-1 <= r["distill_cls_cos"] <= 1 and r["loss_koleo"] > 0 for r in rows)


@pytest.mark.parametrize("objective", ["regression", "prototypes"])
def test_resume_is_exact(
    images: Path, tmp_path: Path, backbone_teacher: Path, heads_teacher: Path, objective: str
) -> None:
    """8 steps == 3 steps, stop, resume, 5 steps: same losses, bit-identical student, heads and centers."""
    teacher = backbone_teacher if objective == "regression" else heads_teacher
    extra = ["loss.koleo_weight=0.1", "data.num_workers=2"]
    train(distill_config(images, tmp_path / "full", teacher, *extra), progress=False)
    part = distill_config(images, tmp_path / "part", teacher, *extra)
    stopped = train(replace(part, train=replace(part.train, max_steps=3)), progress=False)
    assert stopped.step == 3
    assert train(part, resume=True, progress=False).step == 8
    full_rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part_rows = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in part_rows] == list(range(1, 9))
    assert [r["loss"] for r in full_rows] == [r["loss"] for r in part_rows]
    full = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)
    resumed = load_checkpoint(tmp_path / "part" / CHECKPOINT_NAME)
    assert full["method"].keys() == resumed["method"].keys()
    for k, v in full["method"].items():
        assert (v == resumed["method"][k]) if k == "_extra_state" else torch.equal(v, resumed["method"][k]), k
    moments = zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values())
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in moments)


def test_resume_refuses_a_changed_teacher_file(images: Path, tmp_path: Path) -> None:
    teacher = save_teacher(tmp_path / "teacher.safetensors")
    cfg = distill_config(images, tmp_path / "run", teacher)
    train(replace(cfg, train=replace(cfg.train, max_steps=2)), progress=False)
    save_teacher(teacher, seed=2)  # the same architecture, other weights
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(ConfigError, match=r"^distill.teacher: .*teacher.safetensors is not the file the checkpoint"):
        train(cfg, resume=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_the_students_features_approach_the_teachers(images: Path, tmp_path: Path, backbone_teacher: Path) -> None:
    """The cosine of the projected student [cls] with the teacher's rises from its step-0 value."""
    cfg = distill_config(images, tmp_path / "run", backbone_teacher, "optim.epochs=8", "optim.lr=0.5")
    train(cfg, progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = rows[0]["distill_cls_cos"], sum(r["distill_cls_cos"] for r in rows[-4:]) / 4
    assert last > first + 0.3, (first, last)
    assert rows[-1]["distill_patch_cos"] > rows[0]["distill_patch_cos"] + 0.1
