"""Fine-tuning: layer-wise lr decay groups, learning a separable folder, wrong weights refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ibot.config import Config
from ibot.errors import DataError
from ibot.eval.features import load_frozen
from ibot.eval.finetune import Classifier, finetune, param_groups
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime
from ibot.storage import save_backbone


def test_layer_decay_scales_lower_layers_down(tiny_config: Config) -> None:
    model = Classifier(MaskedViT.from_config(tiny_config.model, 16), num_classes=3)
    depth = len(model.backbone.vit.blocks)
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert lr_of[id(model.head.weight)] == 1.0
    assert lr_of[id(model.backbone.vit.blocks[-1].mlp.fc1.weight)] == 0.5
    assert lr_of[id(model.backbone.vit.blocks[0].attn.qkv.weight)] == 0.5**depth
    assert lr_of[id(model.backbone.vit.patch_embed.proj.weight)] == 0.5 ** (depth + 1)
    assert wd_of[id(model.backbone.vit.cls_token)] == 0.0 and wd_of[id(model.head.bias)] == 0.0
    assert wd_of[id(model.head.weight)] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_finetuning_learns_a_separable_folder(tiny_config: Config, image_folder: Path) -> None:
    cfg = replace(
        tiny_config,
        finetune=replace(tiny_config.finetune, epochs=15, batch_size=4, mixup=0.0, cutmix=0.0, lr=2e-2, num_workers=0),
    )
    torch.manual_seed(0)
    backbone = MaskedViT.from_config(cfg.model, 16)
    result = finetune(backbone, cfg, str(image_folder), str(image_folder), Runtime.resolve(cfg.train), progress=False)
    assert result["steps"] == 60 and result["test_top1"] >= 87.5  # 2 colour classes, 16 images


def test_weights_of_another_architecture_are_named(tiny_config: Config, tmp_path: Path) -> None:
    backbone = MaskedViT.from_config(tiny_config.model, 16)
    tensors = backbone.state_dict()
    tensors.pop("mask_token")
    tensors["vit.extra"] = torch.zeros(1)
    tensors["vit.cls_token"] = torch.zeros(1, 1, 7)
    save_backbone(tmp_path / "w.safetensors", tensors, tiny_config.to_dict())
    with pytest.raises(DataError) as info:
        load_frozen(str(tmp_path / "w.safetensors"), on_cpu=True)
    message = str(info.value)
    assert "\n" not in message
    assert (
        "missing: mask_token" in message
        and "unexpected: vit.extra" in message
        and "wrong shape: vit.cls_token" in message
    )
