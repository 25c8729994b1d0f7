"""Backbones from timm / DINO / iBOT state dicts give the same features as the model they came from."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from ibot.errors import DataError
from ibot.eval.features import load_frozen


def _timm_vit(embed_dim: int = 48) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=16, patch_size=4, embed_dim=embed_dim, depth=2, num_heads=2, num_classes=10
    ).eval()


def _assert_same_cls(path: Path, vit: VisionTransformer) -> None:
    frozen = load_frozen(str(path), on_cpu=True)
    backbone, cfg = frozen.backbone, frozen.cfg
    assert (cfg.model.arch, cfg.model.patch_size, cfg.data.global_crop_size) == ("vit_pico", 4, 16)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = vit.forward_features(images)[:, 0]
        torch.testing.assert_close(backbone(images).cls, expected, rtol=1e-5, atol=1e-5)


def test_timm_state_dict_as_pth_and_safetensors(tmp_path: Path) -> None:
    vit = _timm_vit()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")  # classifier head included: dropped on import
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    _assert_same_cls(tmp_path / "vit.pth", vit)
    _assert_same_cls(tmp_path / "vit.safetensors", vit)


def test_ibot_checkpoint_teacher_with_prefixes_and_mask_token(tmp_path: Path) -> None:
    vit = _timm_vit()
    masked_embed = torch.randn(1, 48)
    teacher = {f"module.backbone.{k}": v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    teacher["module.backbone.masked_embed"] = masked_embed
    teacher["module.head.last_layer.weight_g"] = torch.ones(64, 1)
    torch.save({"teacher": teacher, "student": {}, "epoch": 3}, tmp_path / "checkpoint.pth")
    _assert_same_cls(tmp_path / "checkpoint.pth", vit)
    backbone = load_frozen(str(tmp_path / "checkpoint.pth"), on_cpu=True).backbone
    torch.testing.assert_close(backbone.mask_token.flatten(), masked_embed.flatten())


def _chunked(key: str) -> str:
    """``blocks.N.*`` -> ``blocks.N.N.*``: DINOv2 with one block per chunk."""
    return f"blocks.{key.split('.')[1]}.{key[len('blocks.') :]}" if key.startswith("blocks.") else key


def test_dinov2_layer_scale_and_chunked_blocks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=2, init_values=0.5).eval()
    with torch.no_grad():
        for name, param in vit.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(-1.0, 1.0)
    # DINOv2 hub layout: blocks.<chunk>.<block>.*, LayerScale gammas, a (1, D) mask token.
    state = {_chunked(k): v for k, v in vit.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 48)
    assert "blocks.1.1.ls1.gamma" in state
    torch.save(state, tmp_path / "dinov2.pth")
    _assert_same_cls(tmp_path / "dinov2.pth", vit)


def test_unknown_width_names_it(tmp_path: Path) -> None:
    torch.save(_timm_vit(embed_dim=40).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(DataError, match="width 40 is none of"):
        load_frozen(str(tmp_path / "vit.pth"), on_cpu=True)


@pytest.mark.parametrize(("stem", "convs", "depth"), [("conv", 1, 3), ("conv", 2, 2), ("patch", 1, 3)])
def test_shallower_and_conv_stem_files_without_metadata_build_the_same_model(
    tmp_path: Path, stem: str, convs: int, depth: int
) -> None:
    from ibot.config import ModelConfig
    from ibot.models.vit import MaskedViT

    torch.manual_seed(0)
    model = ModelConfig(arch="vit_pico", patch_size=4, depth=depth, stem=stem, stem_convs_per_stage=convs)
    vit = MaskedViT.from_config(model, 16).eval()
    # timm's names (what `ibot export --format timm` and timm's HybridEmbed write), no ibot metadata.
    torch.save({k.removeprefix("vit."): v for k, v in vit.state_dict().items()}, tmp_path / "vit.pth")
    frozen = load_frozen(str(tmp_path / "vit.pth"), on_cpu=True)
    got = frozen.cfg.model
    assert (got.arch, got.patch_size, got.stem, got.stem_convs_per_stage) == ("vit_pico", 4, stem, convs)
    assert frozen.backbone.vit.patch_embed.grid_size == (4, 4) and len(frozen.backbone.vit.blocks) == depth
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(frozen.backbone(images).cls, vit(images).cls)
    # model.init_from reads the same file for the same config (patch size from the stem's stages).
    from ibot.models.init_weights import read_init_weights

    init = read_init_weights(tmp_path / "vit.pth", model, 16)
    assert torch.equal(init.teacher["backbone.vit.pos_embed"], vit.state_dict()["vit.pos_embed"])


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"teacher": _timm_vit().state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "full.pth")
    with pytest.raises(DataError, match="without unpickling"):
        load_frozen(str(tmp_path / "full.pth"), on_cpu=True)


def test_not_a_vit(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "linear.pt")
    with pytest.raises(DataError, match="no 'cls_token'"):
        load_frozen(str(tmp_path / "linear.pt"), on_cpu=True)


def _garbage_files(folder: Path) -> dict[str, str]:
    """Files that are no usable checkpoint, each with the start of the one line it must give."""
    torch.save(_timm_vit().state_dict(), folder / "vit.pth")
    whole = (folder / "vit.pth").read_bytes()
    torch.save(_timm_vit().state_dict(), folder / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = (folder / "legacy.pth").read_bytes()
    files = {
        "notes.pt": (b"model weights: see the README\n", "not a PyTorch checkpoint"),
        "random.pt": (bytes(range(256)) * 64, "not a PyTorch checkpoint"),
        "empty.pth": (b"", "not a PyTorch checkpoint (an empty file)"),
        "pictures.pt": (None, "not a PyTorch checkpoint (a zip archive without data.pkl)"),
        "cut.pth": (whole[: len(whole) // 2], "damaged or truncated PyTorch checkpoint"),
        "cut-legacy.pth": (legacy[: len(legacy) // 2], "damaged or truncated PyTorch checkpoint"),
    }
    for name, (data, _) in files.items():
        if data is None:
            with zipfile.ZipFile(folder / name, "w") as archive:
                archive.writestr("a.txt", "a zip, not a checkpoint")
        else:
            (folder / name).write_bytes(data)
    return {name: says for name, (_, says) in files.items()}


def test_garbage_weights_are_not_called_a_pickle_problem(tmp_path: Path) -> None:
    for name, says in _garbage_files(tmp_path).items():
        with pytest.raises(DataError) as info:
            load_frozen(str(tmp_path / name), on_cpu=True)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name}: {says}"), message
        assert "unpickling" not in message and "\n" not in message
    torch.save({"teacher": _timm_vit().state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "full.pth")
    with pytest.raises(DataError, match=r"without unpickling argparse\.Namespace, which can run arbitrary code"):
        load_frozen(str(tmp_path / "full.pth"), on_cpu=True)
