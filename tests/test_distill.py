"""``ibot distill``: a frozen teacher from a file teaches a smaller ViT; tiny runs on the CPU."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from ibot.cli import main
from ibot.config import Config, load_config
from ibot.distill_method import Distill, resize_patches
from ibot.errors import ConfigError
from ibot.models.init_weights import read_init_weights
from ibot.models.reader import read_backbone
from ibot.models.teacher_file import read_teacher
from ibot.models.vit import MaskedViT
from ibot.storage import CHECKPOINT_NAME, TEACHER_NAME, load_checkpoint, save_backbone
from ibot.train import loop
from ibot.train.loop import train
from ibot.train.metrics import read_metrics

from conftest import free_port, make_image_folder, tiny_overrides


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
    # model.init_from of the run folder (its checkpoint, which holds no teacher) starts from the student.
    init = read_init_weights(tmp_path / "run", cfg.model, 16)
    assert all(torch.equal(v, state[f"student.{k}"]) for k, v in init.teacher.items() if k.startswith("backbone."))


@pytest.mark.parametrize("objective", ["regression", "prototypes", "ema_head"])
def test_resume_is_exact(
    images: Path, tmp_path: Path, backbone_teacher: Path, heads_teacher: Path, objective: str
) -> None:
    """8 steps == 3 steps, stop, resume, 5 steps: same losses, bit-identical student, heads and centers
    (``ema_head``: the teacher's EMA head too)."""
    teacher = heads_teacher if objective == "prototypes" else backbone_teacher
    extra = ["loss.koleo_weight=0.1", "data.num_workers=2", f"distill.objective={objective}"]
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


def test_ema_head_trains_the_teachers_head_and_leaves_its_backbone_as_read(
    images: Path, tmp_path: Path, heads_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``distill.objective=ema_head``: the teacher's head (not its file's) follows the student's by
    EMA and is saved; the teacher's backbone stays the file's, bit for bit."""
    cfg = distill_config(images, tmp_path / "run", heads_teacher, "distill.objective=ema_head", "model.out_dim=24")
    built = _captured_method(monkeypatch)
    train(cfg, progress=False)
    method = built[0]
    assert set(method.teacher) == {"backbone", "head"} and set(method.student) == {"backbone", "proj", "head"}
    assert method.student["head"].last_layer.out_features == 24  # model.out_dim, not the file's K (32)
    fresh = read_teacher(heads_teacher, 16, 3).backbone.state_dict()
    assert all(torch.equal(v, method.teacher["backbone"].state_dict()[k]) for k, v in fresh.items())
    assert not any(p.requires_grad for p in method.teacher.parameters())
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["method"]
    assert not any(k.startswith("teacher.backbone.") for k in state)
    teacher_head = {k.removeprefix("teacher.head."): v for k, v in state.items() if k.startswith("teacher.head.")}
    student_head = {k.removeprefix("student.head."): v for k, v in state.items() if k.startswith("student.head.")}
    assert teacher_head.keys() == student_head.keys() and teacher_head
    # The run folder as the next teacher or as model.init_from: its student backbone; its head reads
    # the projected 192-wide tokens, not the 48-wide backbone's, so it is not offered.
    assert not read_teacher(tmp_path / "run", 16, 3).heads
    assert "ema_head distillation's head" in read_init_weights(tmp_path / "run", cfg.model, 16).fresh_heads
    # It lags the student's (momentum 0.996 -> 1); with momentum 0 it is the student's, bit for bit.
    assert any(not torch.equal(v, student_head[k]) for k, v in teacher_head.items())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["loss_cls"] > 0 and r["loss_patch"] >= 0 for r in rows)
    momentum = ["distill.objective=ema_head", "optim.momentum_teacher=0", "optim.momentum_teacher_end=0"]
    train(distill_config(images, tmp_path / "m0", heads_teacher, *momentum), progress=False)
    state = load_checkpoint(tmp_path / "m0" / CHECKPOINT_NAME)["method"]
    heads = [k for k in state if k.startswith("student.head.")]
    assert heads and all(torch.equal(state[k], state[k.replace("student.", "teacher.", 1)]) for k in heads)


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


def refused(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *overrides: str, command="distill"
) -> str:
    """``ibot COMMAND`` with a pico student and ``overrides``: exit 2, one line, no run folder."""
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    out = tmp_path / "run"
    argv = [command, "--config", str(config), "--no-progress", *tiny_overrides(images, out), "model.depth=1"]
    assert main([*argv, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibot: error: ") and "\n" not in err
    assert not out.exists()
    return err


def test_bad_teachers_are_one_line_before_anything_is_written(
    images: Path, tmp_path: Path, backbone_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.pt"
    assert f"distill.teacher: {missing}: no such file or folder" in refused(
        images, tmp_path, capsys, f"distill.teacher={missing}"
    )
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert str(garbage) in refused(images, tmp_path, capsys, f"distill.teacher={garbage}")
    cnn = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, cnn)
    assert f"{cnn}: no 'cls_token'" in refused(images, tmp_path, capsys, f"distill.teacher={cnn}")
    pico = save_teacher(tmp_path / "pico.safetensors", "model.arch=vit_pico")
    wider = refused(images, tmp_path, capsys, f"distill.teacher={pico}", "model.arch=vit_tiny")
    assert "model.arch: the student (192 x 1, patch 4) is wider than the teacher" in wider
    assert "(48 x 1, patch 4): distillation is into a smaller model" in wider
    coarse = save_teacher(tmp_path / "p8.safetensors", "model.patch_size=8")
    err = refused(images, tmp_path, capsys, f"distill.teacher={coarse}", "data.global_crop_size=12")
    assert "distill.teacher: " in err and "patch size 8, which does not divide data.global_crop_size=12" in err
    err = refused(images, tmp_path, capsys, f"distill.teacher={backbone_teacher}", "distill.objective=prototypes")
    assert "distill.objective=prototypes: " in err and "has no projection heads that load" in err
    grey = save_teacher(tmp_path / "grey.safetensors", in_chans=1)
    assert "a backbone of 1 input channels; the config has data.channels=3" in refused(
        images, tmp_path, capsys, f"distill.teacher={grey}"
    )
    assert "train.parallel=fsdp is not supported by ibot distill yet" in refused(
        images, tmp_path, capsys, f"distill.teacher={backbone_teacher}", "train.parallel=fsdp"
    )


def test_the_commands_point_to_each_other(
    images: Path, tmp_path: Path, backbone_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "ibot distill needs the teacher's weights (distill.teacher=PATH)" in refused(images, tmp_path, capsys)
    err = refused(images, tmp_path, capsys, f"distill.teacher={backbone_teacher}", command="pretrain")
    assert "distil with `ibot distill`" in err


def test_an_rgb_teacher_is_adapted_to_grey_images(backbone_teacher: Path) -> None:
    teacher = read_teacher(backbone_teacher, 16, 1)
    assert teacher.backbone.in_chans == 1 and "patch embedding adapted from 3 to 1 input channels" in teacher.notes


def test_a_coarser_teachers_patches_are_resized_to_the_students_grid(
    images: Path, tmp_path: Path, heads_teacher: Path
) -> None:
    assert torch.equal(resize_patches(torch.ones(2, 4, 3), 4), torch.ones(2, 16, 3))
    tokens = torch.randn(2, 16, 3)
    assert resize_patches(tokens, 4) is tokens
    # A /8 teacher (a 2 x 2 grid) teaches a /4 student (4 x 4), with its heads.
    run = tmp_path / "p8"
    train(load_config(None, [*tiny_overrides(images, run), "model.patch_size=8", "optim.epochs=1"]), progress=False)
    result = train(distill_config(images, tmp_path / "run", run), progress=False)
    assert result.step == 8 and torch.isfinite(torch.tensor(result.last_loss))


def test_a_distill_run_folder_is_the_students_for_monitor_eval_and_export(
    images: Path,
    tmp_path: Path,
    backbone_teacher: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import timm

    from ibot.eval.monitor import KNNMonitor

    built = _captured_method(monkeypatch)
    scored: list[torch.nn.Module] = []
    score = KNNMonitor.__call__
    monkeypatch.setattr(KNNMonitor, "__call__", lambda self, backbone: scored.append(backbone) or score(self, backbone))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"distill": {"teacher": str(backbone_teacher)}}))
    run = tmp_path / "run"
    monitor = [
        "eval.monitor_every_steps=4",
        f"eval.train_path={images}",
        f"eval.test_path={images}",
        "eval.monitor_k=5",
    ]
    argv = ["distill", "--config", str(config), *tiny_overrides(images, run), "model.depth=1"]
    assert main([*argv, *monitor]) == 0
    progress = capsys.readouterr().err
    assert "teacher_ms=" in progress and "student_ms=" in progress  # the progress line's step times
    assert scored and all(b is built[0].student["backbone"] for b in scored)  # the monitor scores the student
    assert "knn_top1" in read_metrics(run / "metrics.jsonl")[-1]
    knn = ["eval", "knn", str(run), "--train-dir", str(images), "--test-dir", str(images), "--no-progress"]
    assert main([*knn, "--json", str(tmp_path / "knn.json"), "eval.knn_k=[5]"]) == 0
    assert json.loads((tmp_path / "knn.json").read_text())
    out = tmp_path / "timm"
    assert main(["export", str(run), "--format", "timm", "--out", str(out)]) == 0
    capsys.readouterr()
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    student = MaskedViT.from_config(load_config(None, tiny_overrides(images, run) + ["model.depth=1"]).model, 16)
    weights = load_checkpoint(run / CHECKPOINT_NAME)["method"]
    student.load_state_dict({k.removeprefix("student.backbone."): v for k, v in weights.items() if "backbone." in k})
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = student.eval()(x)
        theirs = model.forward_features(x)
    assert len(model.blocks) == 1 and (theirs[:, 0] - ours.cls).abs().max() < 1e-5


def test_two_process_ddp_distils_like_one_process(images: Path, tmp_path: Path, heads_teacher: Path) -> None:
    """torchrun (gloo, 2 x batch 4) == one process of batch 8: the centers and gradients are reduced."""
    common = [*tiny_overrides(images, tmp_path / "unused"), "model.depth=1", f"distill.teacher={heads_teacher}"]
    train(load_config(None, [*common, "data.batch_size=8", f"train.output_dir={tmp_path / 'single'}"]), progress=False)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    torchrun += ["--master_port", str(free_port()), "-m", "ibot", "distill", "--config", str(config), "--no-progress"]
    overrides = [*common, "data.batch_size=4", f"train.output_dir={tmp_path / 'ddp'}", "train.threads=1"]
    done = subprocess.run([*torchrun, *overrides, "train.device=cpu"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("single", "ddp"))
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [1, 2, 3, 4]
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    a, b = (load_checkpoint(tmp_path / run / CHECKPOINT_NAME)["method"] for run in ("single", "ddp"))
    assert a.keys() == b.keys() and a.pop("_extra_state") == b.pop("_extra_state")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_model_init_from_starts_the_student(images: Path, tmp_path: Path, heads_teacher: Path) -> None:
    """A pico student (48 x 2) started from a pico run's weights, taught by a 192-wide teacher."""
    teacher = save_teacher(tmp_path / "teacher.safetensors")
    cfg = distill_config(images, tmp_path / "run", teacher, "model.depth=0", f"model.init_from={heads_teacher}")
    method = Distill.from_config(cfg)
    method.start_from(read_init_weights(heads_teacher, cfg.model, 16))
    weights = load_checkpoint(heads_teacher / CHECKPOINT_NAME)["method"]
    student = method.student["backbone"].state_dict()
    assert all(torch.equal(v, weights[f"teacher.backbone.{k}"]) for k, v in student.items())
    assert train(cfg, progress=False).step == 8


def test_foreign_teachers_are_built_with_their_own_architecture(images: Path, tmp_path: Path) -> None:
    """A DINO checkpoint (192 x 1, /8, with its head) -> prototypes; a timm state dict alone -> regression."""
    from timm.models.vision_transformer import VisionTransformer

    from ibot.models.heads import ProjectionHead

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=192, depth=1, num_heads=3, num_classes=0).eval()
    head = ProjectionHead(192, 32, hidden_dim=32, bottleneck_dim=16)
    keys = {f"head.{k}": v for k, v in head.state_dict().items()}
    keys = {k.replace("parametrizations.weight.original0", "weight_g"): v for k, v in keys.items()}
    keys = {k.replace("parametrizations.weight.original1", "weight_v"): v for k, v in keys.items()}
    teacher = {**{f"backbone.{k}": v for k, v in vit.state_dict().items()}, **keys}
    torch.save({"student": teacher, "teacher": teacher}, tmp_path / "dino.pth")
    torch.save(vit.state_dict(), tmp_path / "timm.pth")
    x = torch.randn(2, 3, 16, 16)
    for name, layout, objective in (("dino.pth", "official DINO", "prototypes"), ("timm.pth", "ViT", "regression")):
        cfg = distill_config(images, tmp_path / f"run-{objective}", tmp_path / name)
        method = Distill.from_config(cfg)
        assert method.objective == objective and layout in method.teacher_file.layout
        assert "192 x 1, patch 8" in method.start_line()
        with torch.no_grad():
            torch.testing.assert_close(method.teacher["backbone"](x).cls, vit.forward_features(x)[:, 0])
        assert train(cfg, progress=False).step == 8


def test_a_distill_run_resumes_only_as_a_distill_run(
    images: Path, tmp_path: Path, backbone_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = distill_config(images, tmp_path / "run", backbone_teacher)
    train(replace(cfg, train=replace(cfg.train, max_steps=2)), progress=False)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    argv = ["pretrain", "--config", str(config), "--no-progress", *tiny_overrides(images, tmp_path / "run")]
    assert main([*argv, "model.depth=1", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint was written by ibot distill (distill.teacher set); resume it the same way" in err
    assert "\n" not in err


def test_a_conv_stem_teacher_without_metadata_is_read_as_evaluation_reads_it(images: Path, tmp_path: Path) -> None:
    """timm-named tensors of a conv-stem ViT (no saved config): its patch size from the stem's stages."""
    from ibot.config import ModelConfig

    torch.manual_seed(0)
    vit = MaskedViT.from_config(ModelConfig(arch="vit_tiny", depth=1, patch_size=8, stem="conv"), 16).eval()
    torch.save({k.removeprefix("vit."): v for k, v in vit.state_dict().items()}, tmp_path / "conv.pth")
    method = Distill.from_config(distill_config(images, tmp_path / "run", tmp_path / "conv.pth"))
    assert method.teacher_file.model.stem == "conv" and "192 x 1, patch 8" in method.start_line()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(method.teacher["backbone"](x).cls, vit(x).cls)
