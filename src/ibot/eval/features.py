"""Frozen backbones and the one feature-extraction pass every probe uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ibot.config import Config, config_from_dict
from ibot.data.datasets import Sample
from ibot.data.loaders import build_dataset
from ibot.data.transforms import build_eval_transform
from ibot.models.vit import MaskedViT
from ibot.train.checkpoint import load_backbone
from ibot.train.runtime import Runtime


@dataclass(frozen=True)
class Features:
    """[cls] features (X, D), labels (X,), and how many images could not be read."""

    cls: torch.Tensor
    labels: torch.Tensor
    skipped: int


def load_frozen_backbone(path: str, random_init: bool = False, seed: int = 0) -> tuple[MaskedViT, Config]:
    """The backbone saved at ``path`` (a ``teacher.safetensors`` or a run folder), in eval mode.

    With ``random_init`` the same architecture is built from seed ``seed`` and the weights are
    not loaded: the untrained baseline of the same shape.
    """
    tensors, config_dict = load_backbone(path)
    cfg = config_from_dict(config_dict)
    torch.manual_seed(seed)
    backbone = MaskedViT.from_config(cfg.model, cfg.data.global_crop_size)
    if not random_init:
        backbone.load_state_dict(tensors)
    return backbone.eval().requires_grad_(False), cfg


def _collate(items: list[Sample | str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    samples = [s for s in items if isinstance(s, Sample)]
    if not samples:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(items)
    images = torch.stack([s.view for s in samples])
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return images, labels, len(items) - len(samples)


def build_eval_dataset(folder: str, cfg: Config) -> Dataset:
    """``folder`` (or shards) under the DINO evaluation transform of ``cfg``."""
    transform = build_eval_transform(cfg.data.global_crop_size, cfg.eval.crop_ratio, cfg.data.mean, cfg.data.std)
    return build_dataset(folder, transform, cfg.data.format, cfg.data.index_cache)


@torch.no_grad()
def cls_features(backbone: MaskedViT, images: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """(X, 3, S, S) images -> (X, D) fp32 [cls] after the final norm, on the CPU."""
    with runtime.autocast():
        return backbone(images.to(runtime.device)).cls.float().cpu()


@torch.no_grad()
def extract_features(
    backbone: MaskedViT,
    folder: str,
    cfg: Config,
    runtime: Runtime,
    num_workers: int = 2,
    progress: bool = True,
) -> Features:
    """[cls] after the final norm for every image of ``folder`` (or shards; DINO k-NN protocol)."""
    loader = DataLoader(build_eval_dataset(folder, cfg), batch_size=cfg.eval.batch_size, num_workers=num_workers, collate_fn=_collate)
    backbone = backbone.to(runtime.device)
    feats, labels, skipped = [], [], 0
    for images, batch_labels, batch_skipped in tqdm(loader, desc=f"features {folder}", disable=not progress):
        skipped += batch_skipped
        if images.numel() == 0:
            continue
        feats.append(cls_features(backbone, images, runtime))
        labels.append(batch_labels)
    return Features(torch.cat(feats), torch.cat(labels), skipped)
