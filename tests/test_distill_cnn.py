"""``ibot distill`` into a timm CNN (``distill.student=timm:NAME``): timm's tiny test models on 16 px images."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_distill import _captured_method, distill_config, refused, save_teacher

from ibot.cli import main
from ibot.config import load_config
from ibot.data.collate import Batch
from ibot.distill_method import Distill
from ibot.errors import ConfigError
from ibot.models.cnn_student import TimmCNN, resize_grid
from ibot.models.reader import read_backbone
from ibot.models.teacher_file import read_teacher
from ibot.storage import CHECKPOINT_NAME, load_checkpoint
from ibot.train.loop import train
from ibot.train.metrics import read_metrics

from conftest import make_image_folder, tiny_overrides

RESNET = "distill.student=timm:test_resnet"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("cnn") / "images")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 192 x 1 /4 ViT backbone alone (the regression objective)."""
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


@pytest.fixture(scope="module")
def heads_teacher(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pre-training run's folder: its checkpoint holds the projection head (the prototypes objective)."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    train(load_config(None, tiny_overrides(images, run)), progress=False)
    return run


@pytest.fixture(scope="module")
def resnet_run(images: Path, teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of a test_resnet student: the folder evaluation, embeddings and export read."""
    folder = tmp_path_factory.mktemp("resnet")
    run, config = folder / "run", folder / "c.yaml"
    config.write_text("{}\n")
    argv = ["distill", "--config", str(config), "--no-progress", *tiny_overrides(images, run), "model.depth=1"]
    monitor = ["eval.monitor_every_steps=4", f"eval.train_path={images}", f"eval.test_path={images}"]
    assert main([*argv, f"distill.teacher={teacher}", RESNET, *monitor, "eval.monitor_k=5"]) == 0
    assert "knn_top1" in read_metrics(run / "metrics.jsonl")[-1]  # the k-NN monitor scores the CNN
    return run


def student_of(run: Path) -> TimmCNN:
    """The student rebuilt by hand from the run's checkpoint (not through the code under test's reader)."""
    weights = load_checkpoint(run / CHECKPOINT_NAME)["method"]
    student = TimmCNN("test_resnet", 4)
    student.load_state_dict({k.removeprefix("student.backbone."): v for k, v in weights.items() if "backbone." in k})
    return student.eval()


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_a_cnn_student_learns_the_teachers_features_and_the_teacher_stays_as_read(
    images: Path,
    tmp_path: Path,
    teacher: Path,
    name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    extra = [f"distill.student=timm:{name}", "optim.epochs=8", "optim.lr=0.5"]
    cfg = distill_config(images, tmp_path / "run", teacher, *extra)
    built = _captured_method(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ibot"):
        assert train(cfg, progress=False).step == 32
    start = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("distill: teacher"))
    assert f"student timm {name} (" in start and "tokens of 4 px" in start
    method = built[0]
    student = method.student["backbone"]
    assert isinstance(student, TimmCNN) and student.embed_dim == student.cnn.num_features
    fresh = read_teacher(teacher, 16, 3).backbone.state_dict()
    held = method.teacher["backbone"].state_dict()
    assert fresh.keys() == held.keys() and all(torch.equal(v, held[k]) for k, v in fresh.items())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = rows[0]["distill_cls_cos"], sum(r["distill_cls_cos"] for r in rows[-4:]) / 4
    assert last > first + 0.3, (first, last)
    assert rows[-1]["distill_patch_cos"] > rows[0]["distill_patch_cos"] + 0.1
    # The run's backbone file is the CNN (timm's own keys under cnn.), its config names it.
    tensors, config = read_backbone(tmp_path / "run")
    assert config["distill"]["student"] == f"timm:{name}"
    assert tensors.keys() == {f"cnn.{k}" for k in student.cnn.state_dict()}


def test_a_cnn_student_is_never_masked() -> None:
    """The module ignores a mask; the prototypes objective then counts every patch (see the resume test)."""
    student = TimmCNN("test_resnet", 4).eval()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.rand(2, 16) > 0.5
    with torch.no_grad():
        a, b = student(x), student(x, mask)
    assert torch.equal(a.patches, b.patches) and a.patches.shape == (2, 16, student.embed_dim)
    # Finer maps are averaged onto the grid, coarser ones interpolated.
    fine = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(resize_grid(fine, (2, 2)), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert torch.equal(resize_grid(torch.ones(1, 3, 1, 1), (4, 4)), torch.ones(1, 3, 4, 4))


def test_the_prototypes_objective_counts_every_patch_of_a_cnn_student(images: Path, heads_teacher: Path) -> None:
    """A batch that masks nothing has no iBOT patch term for a ViT; a CNN student's covers every token."""
    cfg = distill_config(images, images.parent / "unused", heads_teacher, RESNET)
    method = Distill.from_config(cfg)
    assert method.objective == "prototypes"
    torch.manual_seed(0)
    batch = Batch(
        torch.randn(8, 3, 16, 16), torch.randn(8, 3, 8, 8), torch.zeros(8, 16, dtype=torch.bool), torch.zeros(4)
    )
    out = method(batch, teacher_temp=0.04)
    assert out.parts["patch"] > 0 and torch.isfinite(out.total)


@pytest.mark.parametrize("objective", ["regression", "prototypes"])
def test_resume_is_exact(images: Path, tmp_path: Path, teacher: Path, heads_teacher: Path, objective: str) -> None:
    """8 steps == 3 steps, stop, resume, 5 steps: same losses, bit-identical student (BatchNorm statistics too)."""
    source = teacher if objective == "regression" else heads_teacher
    extra = [RESNET, "loss.koleo_weight=0.1"]
    train(distill_config(images, tmp_path / "full", source, *extra), progress=False)
    part = distill_config(images, tmp_path / "part", source, *extra)
    assert train(replace(part, train=replace(part.train, max_steps=3)), progress=False).step == 3
    assert train(part, resume=True, progress=False).step == 8
    full_rows, part_rows = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("full", "part"))
    assert [r["loss"] for r in full_rows] == [r["loss"] for r in part_rows]
    full, resumed = (load_checkpoint(tmp_path / r / CHECKPOINT_NAME)["method"] for r in ("full", "part"))
    assert full["_extra_state"] == resumed["_extra_state"]
    assert full["_extra_state"]["objective"] == objective
    assert full["_extra_state"]["student"] == "timm:test_resnet"
    assert any(k.endswith("running_var") for k in full)
    assert all(torch.equal(v, resumed[k]) for k, v in full.items() if k != "_extra_state")
    if objective == "prototypes":  # no masking: the patch loss covers every token, so it is never 0
        assert all(r["loss_patch"] > 0 for r in full_rows)


def test_resume_refuses_another_student(images: Path, tmp_path: Path, teacher: Path) -> None:
    cfg = distill_config(images, tmp_path / "run", teacher)
    train(replace(cfg, train=replace(cfg.train, max_steps=2)), progress=False)
    cnn = distill_config(images, tmp_path / "run", teacher, RESNET)
    with pytest.raises(ConfigError, match=r"^distill.student: the checkpoint's student is vit, this run's timm:"):
        train(cnn, resume=True, progress=False)


def test_bad_students_are_one_line_before_anything_is_written(
    images: Path, tmp_path: Path, teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with_teacher = f"distill.teacher={teacher}"
    err = refused(images, tmp_path, capsys, with_teacher, "distill.student=timm:no_such_net")
    assert "distill.student=timm:no_such_net: timm has no model of that name" in err
    assert "must be vit or timm:NAME" in refused(images, tmp_path, capsys, with_teacher, "distill.student=resnet18")
    # ConvNeXt's stem and downsampling need more than the 8 px local crops.
    err = refused(images, tmp_path, capsys, with_teacher, "distill.student=timm:test_convnext")
    assert err.startswith("ibot: error: data.local_crop_size=8: too small for distill.student=timm:test_convnext")
    # A timm ViT has tokens, MambaOut a channels-last map pooled by an MLP of another width: no CNN map.
    for name in ("test_vit", "test_mambaout"):
        err = refused(images, tmp_path, capsys, with_teacher, f"distill.student=timm:{name}", "data.local_crop_size=16")
        assert f"distill.student=timm:{name}: its features are no (B, 64, H, W) map pooled to 64 values" in err
    err = refused(images, tmp_path, capsys, with_teacher, RESNET, "model.patch_size=8")
    assert "model.patch_size=8: a CNN student's feature map is resized to the teacher's patch grid" in err
    assert "set model.patch_size=4" in err
    err = refused(images, tmp_path, capsys, with_teacher, RESNET, f"model.init_from={teacher}")
    assert "model.init_from: starts ViT students only" in err
    frozen = ["mim.target=frozen", f"mim.tokenizer_path={teacher}"]
    err = refused(images, tmp_path, capsys, RESNET, *frozen, command="pretrain")
    assert "mim.target: frozen reads a ViT tokenizer; a timm CNN student takes online or codebook" in err
    err = refused(images, tmp_path, capsys, "distill.student=timm:test_convnext", command="pretrain")
    assert err.startswith("ibot: error: data.local_crop_size=8: too small for distill.student=timm:test_convnext")


def test_eval_knn_embed_and_pictures_read_a_cnn_run(
    images: Path, tmp_path: Path, resnet_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    knn = ["eval", "knn", str(resnet_run), "--train-dir", str(images), "--test-dir", str(images), "--no-progress"]
    assert main([*knn, "--json", str(tmp_path / "knn.json"), "eval.knn_k=[5]"]) == 0
    assert json.loads((tmp_path / "knn.json").read_text())
    student = student_of(resnet_run)
    embed = ["embed", str(resnet_run), "--images", str(images), "--no-progress"]
    assert main([*embed, "--out", str(tmp_path / "cls.npy")]) == 0
    assert main([*embed, "--out", str(tmp_path / "patch.npy"), "--pool", "patch"]) == 0
    cls, patches = np.load(tmp_path / "cls.npy"), np.load(tmp_path / "patch.npy")
    assert cls.shape == (16, student.embed_dim) and patches.shape == (16, 4, 4, student.embed_dim)
    assert np.isfinite(cls).all() and np.abs(cls).sum() > 0
    assert (
        main(["visualize", "pca", str(resnet_run), "--images", str(images), "--output", str(tmp_path / "p.png")]) == 0
    )
    capsys.readouterr()
    before = sorted(resnet_run.rglob("*"))
    assert main(["visualize", "attention", str(resnet_run), "--images", str(images)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ibot: error: distill.student=timm:test_resnet: a CNN student has no attention to draw; " + (
        "try ibot visualize pca or clusters"
    )
    probe = ["eval", "probe", str(resnet_run), "--train-dir", str(images), "--test-dir", str(images), "--no-progress"]
    assert main(probe) == 2
    assert "a CNN student has one feature map" in capsys.readouterr().err
    finetune = ["eval", "finetune", *probe[2:]]
    assert main(finetune) == 2
    assert "finetune decays the learning rate by ViT block; not for timm:test_resnet" in capsys.readouterr().err
    assert sorted(resnet_run.rglob("*")) == before


def test_export_timm_and_onnx_round_trip(tmp_path: Path, resnet_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime
    import timm

    student = student_of(resnet_run)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = student(x)
    out = tmp_path / "timm"
    assert main(["export", str(resnet_run), "--format", "timm", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert (model(x) - ours.cls).abs().max() < 1e-5
    onnx = tmp_path / "onnx"
    assert main(["export", str(resnet_run), "--format", "onnx", "--out", str(onnx)]) == 0
    session = onnxruntime.InferenceSession(str(onnx / "model.onnx"), providers=["CPUExecutionProvider"])
    cls, patches = session.run(["cls", "patch_tokens"], {"images": x.numpy()})
    assert np.abs(cls - ours.cls.numpy()).max() < 1e-4 and np.abs(patches - ours.patches.numpy()).max() < 1e-4
    capsys.readouterr()
    assert main(["export", str(resnet_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "--format hf is for ViTs; use timm" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_pretrain_trains_a_cnn_from_scratch_and_its_teacher_follows_its_batchnorm(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``ibot pretrain distill.student=timm:NAME``: DINO + the patch loss on the CNN's unmasked grid,
    an EMA teacher whose BatchNorm statistics follow the student's too; resume is exact; the run
    folder exports as timm's own model."""
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")

    def pretrain(run: str, *extra: str) -> int:
        argv = ["pretrain", "--config", str(config), "--no-progress", *tiny_overrides(images, tmp_path / run)]
        return main([*argv, RESNET, "loss.koleo_weight=0.1", *extra])

    with caplog.at_level(logging.INFO, logger="ibot"):
        assert pretrain("full") == 0
    assert "pretrain: student and EMA teacher timm test_resnet (" in caplog.text
    assert pretrain("part", "train.max_steps=3") == 0 and pretrain("part", "--resume") == 0
    full_rows, part_rows = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("full", "part"))
    assert [r["loss"] for r in full_rows] == [r["loss"] for r in part_rows]
    assert all(r["loss_patch"] > 0 for r in full_rows if "loss" in r)
    full, resumed = (load_checkpoint(tmp_path / r / CHECKPOINT_NAME)["method"] for r in ("full", "part"))
    assert all(torch.equal(v, resumed[k]) for k, v in full.items())
    # Both branches' statistics moved off timm's init (0 / 1); the teacher's lag the student's.
    for stat in ("running_mean", "running_var"):
        key = f"backbone.cnn.bn1.{stat}"
        student, teacher = full[f"student.{key}"], full[f"teacher.{key}"]
        assert not torch.equal(teacher, torch.full_like(teacher, float(stat == "running_var")))
        assert not torch.equal(teacher, student)
    saved = load_file(tmp_path / "full" / "teacher.safetensors")  # the run's model: the teacher, statistics too
    assert torch.equal(saved["cnn.bn1.running_mean"], full["teacher.backbone.cnn.bn1.running_mean"])
    capsys.readouterr()
    out = tmp_path / "timm"
    assert main(["export", str(tmp_path / "full"), "--format", "timm", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architecture"] == "test_resnet"
