"""Robustness: a probe trained on clean features, scored on corrupted copies of the test images.

A seeded subset of the test folder is corrupted with each of the 15 CIFAR-10-C corruptions at
severities 1-5 (``ibot.eval.corruptions``), passed through the evaluation transform and the
frozen backbone, and classified by the probe; the summary is the mean over the 75 sets.

The corruptions are defined on 8-bit RGB images (CIFAR-10-C): other than 3 channels is refused
(``require_rgb``); a 3-channel image read at full precision is quantised to 8 bits for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ibot.config import Config
from ibot.data.labels import TrainClasses
from ibot.data.loaders import dataset_from_config
from ibot.data.transforms import build_eval_transform
from ibot.errors import IBOTError
from ibot.eval.corruptions import CORRUPTIONS, corrupt
from ibot.eval.features import aligned_dataset, encode, labelled_subset
from ibot.eval.probes import ProbeResult
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime


@dataclass(frozen=True)
class RobustnessResult:
    """Top-1 % per corruption and severity (1-5), on the clean subset, and the mean over all."""

    images: int
    clean_top1: float
    top1: dict[str, list[float]]

    @property
    def mean_corrupted_top1(self) -> float:
        return float(np.mean([v for values in self.top1.values() for v in values]))

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "clean_top1": self.clean_top1,
            "mean_corrupted_top1": self.mean_corrupted_top1,
            "per_corruption": {k: float(np.mean(v)) for k, v in self.top1.items()},
            "per_severity": self.top1,
        }


def require_rgb(cfg: Config) -> None:
    """One line when the run's images are not RGB: the CIFAR-10-C corruptions (colour, JPEG, ...) need 3 channels."""
    if cfg.data.channels != 3:
        raise IBOTError(
            f"eval robustness: data.channels={cfg.data.channels}; "
            "the CIFAR-10-C corruptions are defined on RGB images only"
        )


def _eight_bit(view: np.ndarray) -> np.ndarray:
    """A decoded image as (H, W, 3) uint8: a full-precision one in [0, 1] rounded to 8 bits."""
    if view.dtype == np.uint8:
        return view
    return np.round(np.clip(view, 0.0, 1.0) * 255).astype(np.uint8)


def _load_subset(
    folder: str, count: int, cfg: Config, seed: int, train: TrainClasses | None
) -> tuple[list[np.ndarray], torch.Tensor]:
    """``count`` raw RGB uint8 images of ``folder`` (seeded) and their labels (``train``'s indices)."""
    dataset = aligned_dataset(dataset_from_config(folder, np.asarray, cfg.data), folder, train)
    samples = labelled_subset(dataset, folder, count, seed, "the robustness benchmark")
    return [_eight_bit(s.view) for s in samples], torch.tensor([s.label for s in samples])


@torch.no_grad()
def _top1(
    probe: ProbeResult,
    backbone: MaskedViT,
    images: torch.Tensor,
    labels: torch.Tensor,
    runtime: Runtime,
    n_last: int,
    batch_size: int,
) -> float:
    correct = 0
    for chunk, target in zip(images.split(batch_size), labels.split(batch_size)):
        encoded = encode(backbone, chunk, runtime, n_last, torch.float32)
        cls, patches = probe.standardise(encoded.cls, encoded.patches)
        correct += int((probe.module(cls, patches).argmax(dim=1) == target).sum())
    return 100.0 * correct / len(labels)


def corruption_benchmark(
    probe: ProbeResult,
    backbone: MaskedViT,
    test_folder: str,
    cfg: Config,
    runtime: Runtime,
    count: int,
    n_last: int,
    seed: int = 0,
    progress: bool = True,
    train: TrainClasses | None = None,
) -> RobustnessResult:
    """``probe`` (trained on clean features of ``n_last`` blocks) on ``count`` corrupted test images.

    ``train``: the classes the probe was trained on; the test labels are mapped onto them by name.
    """
    require_rgb(cfg)
    arrays, labels = _load_subset(test_folder, count, cfg, seed, train)
    transform = build_eval_transform(cfg.eval_image_size, cfg.eval.crop_ratio, cfg.data.mean, cfg.data.std)
    backbone = backbone.to(runtime.device).eval()

    def prepared(images: list[np.ndarray]) -> torch.Tensor:
        return torch.stack([transform(Image.fromarray(a)) for a in images])

    bs = cfg.eval.batch_size
    clean = _top1(probe, backbone, prepared(arrays), labels, runtime, n_last, bs)
    top1: dict[str, list[float]] = {}
    jobs = [(c, s) for c in CORRUPTIONS for s in range(1, 6)]
    for number, (name, severity) in enumerate(tqdm(jobs, desc="corruptions", disable=not progress)):
        rng = np.random.default_rng([seed, number])
        images = prepared([corrupt(a, name, severity, rng) for a in arrays])
        top1.setdefault(name, []).append(_top1(probe, backbone, images, labels, runtime, n_last, bs))
    return RobustnessResult(len(labels), clean, top1)
