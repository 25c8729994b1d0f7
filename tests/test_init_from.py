"""``model.init_from``: runs start from this package's, official iBOT/DINO, timm and DINOv2 weights.

Every source is written here with its layout's key names, from a timm ViT or this package's
model, and the loaded backbones must compute what the source computes.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from ibot.config import Config, load_config
from ibot.errors import ConfigError, DataError
from ibot.method import IBOT
from ibot.models.heads import ProjectionHead
from ibot.models.init_weights import InitWeights, read_init_weights
from ibot.storage import load_checkpoint
from ibot.train.loop import train

from conftest import tiny_overrides

WIDTH = 48  # vit_pico


def _config(images: Path, out: Path, *extra: str) -> Config:
    return load_config(None, [*tiny_overrides(images, out), *extra])


def _timm_vit(size: int = 16, width: int = WIDTH, depth: int = 2, seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=size, patch_size=4, embed_dim=width, depth=depth, num_heads=2, num_classes=0, **kwargs
    )
    with torch.no_grad():  # timm starts position embeddings and tokens near 0: make them count
        for name, param in vit.named_parameters():
            if name in ("pos_embed", "cls_token") or name.endswith("gamma"):
                param.copy_(torch.randn_like(param) * 0.5)
    return vit.eval()


def _official_head(seed: int, out_dim: int = 32) -> ProjectionHead:
    torch.manual_seed(seed)
    head = ProjectionHead(WIDTH, out_dim, hidden_dim=32, bottleneck_dim=16)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)  # norms that are not 1
    return head


def _head_keys(head: ProjectionHead, last: str = "last_layer") -> dict[str, torch.Tensor]:
    """A ``ProjectionHead`` written with DINO/iBOT's names: ``mlp.N.*``, ``<last>.weight_g/_v``."""
    out = {f"head.{k}": v for k, v in head.mlp.state_dict().items()}
    out = {k.replace("head.", "head.mlp.", 1): v for k, v in out.items()}
    weights = head.last_layer.parametrizations.weight
    out[f"head.{last}.weight_g"] = weights.original0.detach().clone()
    out[f"head.{last}.weight_v"] = weights.original1.detach().clone()
    return out


def _official_branch(vit: VisionTransformer, head: dict[str, torch.Tensor], prefix: str, masked_embed=None) -> dict:
    branch = {f"{prefix}backbone.{k}": v for k, v in vit.state_dict().items()}
    if masked_embed is not None:
        branch[f"{prefix}backbone.masked_embed"] = masked_embed
    return branch | {f"{prefix}{k}": v for k, v in head.items()}


def _method(cfg: Config, init: InitWeights) -> IBOT:
    torch.manual_seed(1)
    method = IBOT(cfg.model, cfg.loss, cfg.data.global_crop_size, cfg.mim)
    init.load_into(method.student, method.teacher)
    return method.eval()


def _assert_same_features(method_or_backbone, vit: VisionTransformer, size: int = 16) -> None:
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = vit.forward_features(images)
        tokens = method_or_backbone(images)
    torch.testing.assert_close(tokens.cls, expected[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens.patches, expected[:, 1:], rtol=1e-5, atol=1e-5)


def _head_logits(keys: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, last: str = "last_layer") -> torch.Tensor:
    """DINO's head computed from its own key names: MLP, L2 norm, then g * v / |v| per prototype."""
    h = x
    for i in (0, 2, 4):
        h = F.linear(h, keys[f"{prefix}head.mlp.{i}.weight"], keys[f"{prefix}head.mlp.{i}.bias"])
        h = F.gelu(h) if i < 4 else h
    g, v = keys[f"{prefix}head.{last}.weight_g"], keys[f"{prefix}head.{last}.weight_v"]
    return F.normalize(h, dim=-1) @ (g * v / v.norm(dim=1, keepdim=True)).T


def test_official_ibot_checkpoint_separate_patch_head(tmp_path: Path, image_folder: Path) -> None:
    student_vit, teacher_vit = _timm_vit(seed=0), _timm_vit(seed=1)
    cls_head, patch_head = _official_head(2), _official_head(3)
    embeds = torch.randn(1, WIDTH), torch.randn(1, WIDTH)
    student_head = _head_keys(cls_head) | {
        k: v for k, v in _head_keys(patch_head, "last_layer2").items() if "last_layer2" in k
    }
    teacher_head = {k: v + 0.01 for k, v in student_head.items()}
    checkpoint = {
        "student": _official_branch(student_vit, student_head, "module.", embeds[0]),
        "teacher": _official_branch(teacher_vit, teacher_head, "", embeds[1]),
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", lr=5e-4),  # official checkpoints pickle their args
    }
    torch.save(checkpoint, tmp_path / "ibot.pth")
    cfg = _config(image_folder, tmp_path / "run", "model.shared_head=false")
    init = read_init_weights(tmp_path / "ibot.pth", cfg.model, 16)
    assert (init.layout, init.fresh_heads) == ("official iBOT checkpoint", "")
    method = _method(cfg, init)
    _assert_same_features(method.student["backbone"], student_vit)
    _assert_same_features(method.teacher["backbone"], teacher_vit)
    torch.testing.assert_close(method.student["backbone"].mask_token.flatten(), embeds[0].flatten())
    x = torch.randn(5, WIDTH)
    with torch.no_grad():
        for branch, keys, prefix in (
            (method.student, checkpoint["student"], "module."),
            (method.teacher, checkpoint["teacher"], ""),
        ):
            torch.testing.assert_close(branch["cls_head"](x), _head_logits(keys, prefix, x), rtol=1e-5, atol=1e-5)
            expected_patch = _head_logits(keys, prefix, x, "last_layer2")
            torch.testing.assert_close(branch["patch_head"](x), expected_patch, rtol=1e-5, atol=1e-5)


def test_official_dino_checkpoint_into_a_shared_head(tmp_path: Path, image_folder: Path) -> None:
    vit = _timm_vit()
    head = _head_keys(_official_head(2))
    checkpoint = {"student": _official_branch(vit, head, "module."), "teacher": _official_branch(vit, head, "")}
    torch.save(checkpoint, tmp_path / "dino.pth")
    cfg = _config(image_folder, tmp_path / "run")
    init = read_init_weights(tmp_path / "dino.pth", cfg.model, 16)
    assert (init.layout, init.fresh_heads) == ("official DINO checkpoint", "")
    method = _method(cfg, init)
    x = torch.randn(5, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(
            method.teacher["head"](x), _head_logits(checkpoint["teacher"], "", x), rtol=1e-5, atol=1e-5
        )
    _assert_same_features(method.student["backbone"], vit)
    # DINO has no [mask] token: the student keeps the one it was built with.
    assert "backbone.mask_token" not in init.student and method.student["backbone"].mask_token.abs().sum() > 0


def test_heads_of_other_shapes_start_fresh(tmp_path: Path, image_folder: Path) -> None:
    vit = _timm_vit()
    head = _head_keys(_official_head(2, out_dim=64))  # the config has model.out_dim=32
    checkpoint = {"student": _official_branch(vit, head, "module."), "teacher": _official_branch(vit, head, "")}
    torch.save(checkpoint, tmp_path / "dino.pth")
    cfg = _config(image_folder, tmp_path / "run")
    init = read_init_weights(tmp_path / "dino.pth", cfg.model, 16)
    assert init.fresh_heads == "head last_layer.weight is (64, 16) in the file, (32, 16) in the config"
    assert not [k for k in init.student if k.startswith("head.")]
    _assert_same_features(_method(cfg, init).teacher["backbone"], vit)


def test_dinov2_layer_scale_folded_chunks_flattened(tmp_path: Path, image_folder: Path) -> None:
    vit = _timm_vit(init_values=0.1)  # blocks.N.ls1.gamma / ls2.gamma, as DINOv2
    state = {}
    for key, value in vit.state_dict().items():
        if key.startswith("blocks."):  # block_chunks=2: blocks.<chunk>.<block>.*
            block = key.split(".")[1]
            key = f"blocks.{block}.{key[len('blocks.') :]}"
        state[key] = value
    state["mask_token"] = torch.randn(1, WIDTH)
    assert "blocks.1.1.ls2.gamma" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "dinov2.safetensors"))
    cfg = _config(image_folder, tmp_path / "run")
    init = read_init_weights(tmp_path / "dinov2.safetensors", cfg.model, 16)
    assert init.layout == "DINOv2 ViT state dict" and "LayerScale folded" in init.summary()
    method = _method(cfg, init)
    _assert_same_features(method.student["backbone"], vit)
    _assert_same_features(method.teacher["backbone"], vit)
    torch.testing.assert_close(method.student["backbone"].mask_token.flatten(), state["mask_token"].flatten())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"register_tokens": torch.zeros(1, 4, WIDTH)}, "register tokens"),
        ({"blocks.0.mlp.w12.weight": torch.zeros(8, WIDTH)}, "SwiGLU"),
    ],
)
def test_dinov2_registers_and_swiglu_refused(tmp_path: Path, image_folder: Path, extra: dict, message: str) -> None:
    torch.save(_timm_vit().state_dict() | extra, tmp_path / "dinov2.pth")
    cfg = _config(image_folder, tmp_path / "run")
    with pytest.raises(DataError, match=message):
        read_init_weights(tmp_path / "dinov2.pth", cfg.model, 16)


@pytest.mark.parametrize("content", [b"", b"hello, not weights\n", bytes(range(256))], ids=["empty", "text", "bytes"])
def test_a_file_that_is_not_a_checkpoint_is_not_called_a_pickle_problem(
    tmp_path: Path, image_folder: Path, content: bytes
) -> None:
    (tmp_path / "junk.pth").write_bytes(content)
    cfg = _config(image_folder, tmp_path / "run")
    with pytest.raises(DataError, match="junk.pth: not a PyTorch checkpoint") as raised:
        read_init_weights(tmp_path / "junk.pth", cfg.model, 16)
    assert "unpickling" not in str(raised.value)


def test_pos_embed_resampled_to_the_config_crop(tmp_path: Path, image_folder: Path) -> None:
    vit = _timm_vit(size=16, dynamic_img_size=True)  # a 4 x 4 grid; the config's 24 px crop has 6 x 6
    torch.save({f"module.backbone.{k}": v for k, v in vit.state_dict().items()}, tmp_path / "vit.pth")
    cfg = _config(image_folder, tmp_path / "run", "data.global_crop_size=24")
    init = read_init_weights(tmp_path / "vit.pth", cfg.model, 24)
    assert "pos-embed resampled 4x4 -> 6x6" in init.summary()
    assert init.teacher["backbone.vit.pos_embed"].shape == (1, 37, WIDTH)
    # timm resamples the 4 x 4 table for a 24 px input at run time: the same function.
    _assert_same_features(_method(cfg, init).teacher["backbone"], vit, size=24)


def test_train_starts_from_the_checkpoint_at_step_0(
    tmp_path: Path, image_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vit = _timm_vit()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    # Warm-up starts the lr at 0 and momentum 1 freezes the teacher: after one step both branches
    # still hold exactly what they started from.
    cfg = _config(
        image_folder,
        tmp_path / "run",
        f"model.init_from={tmp_path / 'vit.pth'}",
        "train.max_steps=1",
        "optim.momentum_teacher=1.0",
    )
    with caplog.at_level(logging.INFO, logger="ibot.train.loop"):
        result = train(cfg, progress=False)
    assert result.step == 1
    lines = [r.getMessage() for r in caplog.records if "model.init_from" in r.getMessage()]
    assert any(f"backbones from {tmp_path / 'vit.pth'} (ViT state dict)" in line for line in lines), lines
    assert sum("fresh projection heads: the file holds a backbone alone" in line for line in lines) == 1
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["lr"] == 0.0  # the schedules' step 0
    method = IBOT(cfg.model, cfg.loss, 16, cfg.mim).eval()
    method.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["method"])
    _assert_same_features(method.student["backbone"], vit)
    _assert_same_features(method.teacher["backbone"], vit)


def test_resumed_run_keeps_its_checkpoint(tmp_path: Path, image_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, other = _timm_vit(seed=0), _timm_vit(seed=1)
    torch.save(first.state_dict(), tmp_path / "first.pth")
    torch.save(other.state_dict(), tmp_path / "other.pth")
    common = ["optim.momentum_teacher=1.0"]  # the teacher stays what the run started from
    train(
        _config(
            image_folder, tmp_path / "run", f"model.init_from={tmp_path / 'first.pth'}", "train.max_steps=1", *common
        ),
        progress=False,
    )
    cfg = _config(
        image_folder, tmp_path / "run", f"model.init_from={tmp_path / 'other.pth'}", "train.max_steps=2", *common
    )
    with caplog.at_level(logging.INFO, logger="ibot.train.loop"):
        result = train(cfg, resume=True, progress=False)
    assert result.step == 2
    assert "model.init_from ignored: the run resumes from its checkpoint" in caplog.messages
    assert not [m for m in caplog.messages if "from " + str(tmp_path / "other.pth") in m]
    method = IBOT(cfg.model, cfg.loss, 16, cfg.mim).eval()
    method.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["method"])
    _assert_same_features(method.teacher["backbone"], first)


def test_our_run_folder_checkpoint_and_teacher_file(tmp_path: Path, image_folder: Path) -> None:
    cfg = _config(image_folder, tmp_path / "run", "train.max_steps=1", "model.shared_head=false")
    train(cfg, progress=False)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["method"]
    for source in (tmp_path / "run", next((tmp_path / "run").glob("checkpoint-*.pt"))):
        init = read_init_weights(source, cfg.model, 16)
        assert (init.layout, init.fresh_heads) == ("ibot checkpoint", "")
        for branch in ("student", "teacher"):
            loaded = getattr(init, branch)
            mine = {k.removeprefix(f"{branch}."): v for k, v in saved.items() if k.startswith(f"{branch}.")}
            assert loaded.keys() == mine.keys()
            assert all(torch.equal(loaded[k], mine[k]) for k in mine)
    init = read_init_weights(tmp_path / "run" / "teacher.safetensors", cfg.model, 16)
    assert init.layout == "ibot teacher.safetensors" and "backbone alone" in init.fresh_heads
    assert torch.equal(init.student["backbone.vit.cls_token"], saved["teacher.backbone.vit.cls_token"])
    # A shared-head config takes the [cls] head of a run that had two.
    shared = _config(image_folder, tmp_path / "run2")
    init = read_init_weights(tmp_path / "run", shared.model, 16)
    assert torch.equal(init.teacher["head.mlp.0.weight"], saved["teacher.cls_head.mlp.0.weight"])
    assert "patch prototypes left out" in init.summary()


@pytest.mark.parametrize(
    ("extra", "width", "message"),
    [
        ((), 64, r"vit\.pth: width 64, depth 2; the config has model\.arch=vit_pico \(48 x 2\)$"),
        (
            ("model.depth=1",),
            WIDTH,
            r"vit\.pth: width 48, depth 2; the config has model\.arch=vit_pico, model\.depth=1 \(48 x 1\)$",
        ),
        (("model.patch_size=8",), WIDTH, r"vit\.pth: patch size 4; the config has model\.patch_size=8"),
        (("model.stem=conv",), WIDTH, r"vit\.pth: a patch stem; the config has model\.stem=conv$"),
    ],
)
def test_mismatch_is_one_line_before_anything_is_written(
    tmp_path: Path, image_folder: Path, extra: tuple, width: int, message: str
) -> None:
    torch.save(_timm_vit(width=width).state_dict(), tmp_path / "vit.pth")
    cfg = _config(image_folder, tmp_path / "run", f"model.init_from={tmp_path / 'vit.pth'}", *extra)
    with pytest.raises(ConfigError, match=message) as caught:
        train(cfg, progress=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_missing_init_file_is_a_config_error(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.init_from: .*nowhere\.pth: no such file or folder"):
        _config(image_folder, tmp_path / "run", f"model.init_from={tmp_path / 'nowhere.pth'}")
