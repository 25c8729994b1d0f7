"""Per-channel statistics of an image folder: the ``data.mean`` / ``data.std`` of its own pixels.

ImageNet's mean and std are the defaults; a domain's images (microscopy, X-ray, satellite) sit
elsewhere. ``channel_stats`` reads a seeded sample of the folder as the model would see it
before normalisation (values in [0, 1]) and returns each channel's mean and std over every
pixel of the sample, accumulated in float64 so that a large sample loses no precision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ibot.config import DataConfig
from ibot.data.collate import skips_of
from ibot.data.datasets import Sample
from ibot.data.loaders import dataset_from_config
from ibot.data.skips import Skip, SkipLog
from ibot.errors import DataError


@dataclass(frozen=True)
class ChannelStats:
    """Mean and std per channel of ``images`` images (``pixels`` pixels each channel); ``skips``: unreadable files."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: int
    pixels: int
    skips: tuple[Skip, ...] = ()

    def config_snippet(self) -> str:
        """The two lines to put under ``data:`` in a config file (or pass as overrides)."""
        return "\n".join(
            [
                "data:",
                f"  mean: [{', '.join(f'{m:.4f}' for m in self.mean)}]",
                f"  std: [{', '.join(f'{s:.4f}' for s in self.std)}]",
            ]
        )


def to_unit_array(image) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A decoded RGB image as (H, W, C) float32 in [0, 1]: what normalisation receives."""
    return np.asarray(image, dtype=np.float32) / 255.0


def _collate(items: list[Sample | Skip]) -> tuple[list[np.ndarray], tuple[Skip, ...]]:
    return [s.view for s in items if isinstance(s, Sample)], skips_of(items)


class _Moments:
    """Running per-channel sums of x and x^2 in float64."""

    def __init__(self) -> None:
        self.total = self.squares = None
        self.pixels = self.images = 0

    def add(self, pixels: np.ndarray) -> None:
        flat = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64)
        if self.total is None:
            self.total, self.squares = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
        if flat.shape[1] != len(self.total):
            raise DataError(f"images with {flat.shape[1]} and {len(self.total)} channels in one folder")
        self.total += flat.sum(axis=0)
        self.squares += (flat * flat).sum(axis=0)
        self.pixels += flat.shape[0]
        self.images += 1

    def result(self, skips: tuple[Skip, ...]) -> ChannelStats:
        mean = self.total / self.pixels
        var = np.maximum(self.squares / self.pixels - mean * mean, 0.0)
        return ChannelStats(tuple(map(float, mean)), tuple(map(float, np.sqrt(var))), self.images, self.pixels, skips)


def channel_stats(folder: str, data: DataConfig, images: int, seed: int, workers: int = 0) -> ChannelStats:
    """Per-channel mean and std of ``images`` images of ``folder`` drawn with ``seed`` (all if fewer).

    A file that does not decode is skipped and the next one of the seeded order is read instead.
    One line naming the folder when no image of it decodes.
    """
    if images < 1:
        raise DataError(f"--images {images}: must be at least 1")
    workers = min(workers, len(os.sched_getaffinity(0)))  # more loader processes than cores only contend
    dataset = dataset_from_config(folder, to_unit_array, data)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    log = SkipLog(getattr(dataset, "skips", ()))
    moments = _Moments()
    position = 0
    while moments.images < images and position < len(order):
        # Read only what is still missing; unreadable files are replaced from the rest of the order.
        chunk = order[position : position + images - moments.images]
        position += len(chunk)
        loader = DataLoader(
            torch.utils.data.Subset(dataset, chunk), batch_size=64, num_workers=workers, collate_fn=_collate
        )
        for arrays, skipped in loader:
            log.extend(skipped)
            for array in arrays:
                moments.add(array)
    if moments.images == 0:
        raise DataError(f"{folder}: no image decoded; {log.summary('stats')}")
    return moments.result(tuple(log.sorted()))
