"""Full fine-tuning of a pre-trained backbone: the BEiT/iBOT recipe at small scale.

Layer-wise learning-rate decay (the patch embedding gets ``decay ** (depth + 1)`` of the head's
rate, block i ``decay ** (depth - i)``), stochastic depth, label smoothing and mixup/cutmix
(timm), AdamW with warm-up + cosine; a linear head on the [cls] token. Top-1 on the test folder.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T
from tqdm import tqdm

from ibot.config import Config, FinetuneConfig
from ibot.data.eval_transform import ArrayToTensor, UnitClamp
from ibot.data.loaders import dataset_from_config
from ibot.data.skips import SkipLog
from ibot.eval.features import build_eval_dataset, collate_eval, dataset_skips, require_labels, train_classes
from ibot.models.vit import MaskedViT
from ibot.optim import adamw, cosine_schedule
from ibot.runtime import Runtime


class Classifier(nn.Module):
    """Backbone + linear head on the final-norm [cls] token."""

    def __init__(self, backbone: MaskedViT, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images).cls)


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings and tokens, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.startswith("backbone.vit.blocks."):
        return int(name.split(".")[3]) + 1
    if name.startswith(
        ("backbone.vit.patch_embed", "backbone.vit.cls_token", "backbone.vit.pos_embed", "backbone.mask_token")
    ):
        return 0
    return depth + 1


def param_groups(model: Classifier, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups by (layer, decay or not), each with lr scaled by ``layer_decay ** (depth + 1 - layer)``."""
    depth = len(model.backbone.vit.blocks)
    no_decay = {f"backbone.{n}" for n in model.backbone.no_weight_decay()}
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        decay = param.ndim > 1 and name not in no_decay
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - layer),
            },
        )
        group["params"].append(param)
    for group in groups.values():
        group["lr"] = lr * group["lr_scale"]
    return list(groups.values())


class _BrightnessContrast:
    """ColorJitter's brightness and contrast for any channel count: one factor per image for all
    channels, contrast around the mean of every channel (torchvision's needs 1 or 3 channels)."""

    def __init__(self, brightness: float, contrast: float) -> None:
        self.brightness, self.contrast = brightness, contrast

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        b = float(torch.empty(1).uniform_(1 - self.brightness, 1 + self.brightness))
        c = float(torch.empty(1).uniform_(1 - self.contrast, 1 + self.contrast))
        image = (image * b).clamp(0, 1)
        return (c * image + (1 - c) * image.mean()).clamp(0, 1)

    def __repr__(self) -> str:
        return f"_BrightnessContrast({self.brightness}, {self.contrast})"


class _TrainTransform:
    """The fine-tuning augmentation of an 8-bit RGB PIL image (torchvision's PIL path) or of an
    (H, W, C) float32 array in [0, 1] (the same steps on a tensor; saturation only for 1 or 3
    channels, where torchvision defines it)."""

    def __init__(self, cfg: Config) -> None:
        size, bicubic = cfg.eval_image_size, T.InterpolationMode.BICUBIC
        crop = T.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=bicubic, antialias=True)
        normalize = T.Normalize(cfg.data.mean, cfg.data.std)
        self.pil = T.Compose([crop, T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4), T.ToTensor(), normalize])
        rgb_like = cfg.data.channels in (1, 3)
        jitter = T.ColorJitter(0.4, 0.4, 0.4) if rgb_like else _BrightnessContrast(0.4, 0.4)
        self.array = T.Compose([ArrayToTensor(), crop, T.RandomHorizontalFlip(), jitter, UnitClamp(), normalize])

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        return self.array(image) if isinstance(image, np.ndarray) else self.pil(image)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, runtime: Runtime, skips: SkipLog | None = None) -> float:
    """Top-1 % of ``model`` on ``loader``; the skipped files go into ``skips``."""
    model.eval()
    correct = total = 0
    for images, labels, batch_skips in loader:
        if skips is not None:
            skips.extend(batch_skips)
        if images.numel() == 0:
            continue
        with runtime.autocast():
            logits = model(images.to(runtime.device))
        correct += int((logits.argmax(dim=1).cpu() == labels).sum())
        total += labels.numel()
    return 100.0 * correct / max(1, total)


def finetune(
    backbone: MaskedViT,
    cfg: Config,
    train_dir: str,
    test_dir: str,
    runtime: Runtime,
    progress: bool = True,
    skips: SkipLog | None = None,
) -> dict[str, float]:
    """Fine-tune ``backbone`` (built with ``cfg.finetune.drop_path``) on ``train_dir``; test top-1 and more.

    The files of either folder that were left out (scan and decoding) go into ``skips``.
    """
    skips = SkipLog() if skips is None else skips
    settings: FinetuneConfig = cfg.finetune
    seed = cfg.train.seed
    torch.manual_seed(seed)
    train_set = dataset_from_config(train_dir, _TrainTransform(cfg), cfg.data)
    skips.extend(dataset_skips(train_set))
    require_labels(train_set.labels, train_dir, "fine-tuning")  # type: ignore[attr-defined]
    classes = train_classes(train_set, train_dir, cfg, "fine-tuning")
    num_classes = len(classes.names)
    model = Classifier(backbone.requires_grad_(True), num_classes).to(runtime.device)
    lr = settings.lr * settings.batch_size / 256
    optimizer = adamw(param_groups(model, lr, settings.weight_decay, settings.layer_decay), runtime.device)
    loader = DataLoader(
        train_set,
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=settings.num_workers,
        collate_fn=collate_eval,
        persistent_workers=settings.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    test_set = build_eval_dataset(test_dir, cfg, classes)  # labelled by the train classes' names
    skips.extend(dataset_skips(test_set))
    test_loader = DataLoader(
        test_set,
        batch_size=cfg.eval.batch_size,
        num_workers=settings.num_workers,
        collate_fn=collate_eval,
    )
    # timm's Mixup draws from numpy's global RNG; with both alphas 0 it only smooths labels.
    np.random.seed(seed)
    mixing = settings.mixup > 0 or settings.cutmix > 0
    mixup = Mixup(
        mixup_alpha=settings.mixup,
        cutmix_alpha=settings.cutmix,
        prob=1.0 if mixing else 0.0,
        label_smoothing=settings.label_smoothing,
        num_classes=num_classes,
    )
    criterion = SoftTargetCrossEntropy()
    total = max(1, int(settings.epochs * len(loader)))
    warmup = int(settings.warmup_epochs * len(loader))
    step, last_loss = 0, math.nan
    bar = tqdm(total=total, desc="fine-tune", disable=not progress)
    model.train()
    while step < total:
        for images, targets, batch_skips in loader:
            skips.extend(batch_skips)
            if step >= total:
                break
            if images.shape[0] % 2:  # timm's Mixup mixes pairs: it needs an even batch
                images, targets = images[:-1], targets[:-1]
            # From 1/warmup, not 0: the first step already learns.
            scale = cosine_schedule(step, total, 1.0, 0.0, warmup, warmup_start=1.0 / max(warmup, 1))
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"] * scale
            images, soft = mixup(images.to(runtime.device), targets.to(runtime.device))
            with runtime.autocast():
                logits = model(images)
            loss = criterion(logits.float(), soft)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            step += 1
            if step % 20 == 0 or step == total:
                last_loss = float(loss.detach())
                bar.set_postfix(loss=f"{last_loss:.3f}")
            bar.update(1)
    bar.close()
    return {
        "test_top1": evaluate(model, test_loader, runtime, skips),
        "train_loss": last_loss,
        "epochs": settings.epochs,
        "steps": step,
    }
