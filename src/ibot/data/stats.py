"""Per-channel statistics of an image folder: the ``data.mean`` / ``data.std`` of its own pixels.

ImageNet's mean and std are the defaults; a domain's images (microscopy, X-ray, satellite) sit
elsewhere. ``channel_stats`` reads a seeded sample of the folder as the model would see it
before normalisation (values in [0, 1]) and returns each channel's mean and std over every
pixel of the sample, accumulated in float64 so that a large sample loses no precision.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ibot.config import DataConfig
from ibot.data.collate import skips_of
from ibot.data.datasets import Sample, files_digest
from ibot.data.index_cache import cache_path, read_entry, write_cache
from ibot.data.loaders import dataset_from_config
from ibot.data.skips import Skip, SkipLog
from ibot.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelStats:
    """Mean and std per channel of ``images`` images (``pixels`` pixels each channel); ``skips``: unreadable files."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: int
    pixels: int
    skips: tuple[Skip, ...] = ()
    drawn: int = 0  # how many of the seeded order were read (skipped files included)

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
    """A decoded image as (H, W, C) float32 in [0, 1]: what normalisation receives.

    8-bit RGB images are divided by 255; arrays from ``ibot.data.reading`` are already mapped
    by ``data.intensity`` and have ``data.channels`` channels.
    """
    if isinstance(image, np.ndarray) and image.dtype == np.float32:
        return image
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

    def result(self, skips: tuple[Skip, ...], drawn: int) -> ChannelStats:
        mean = self.total / self.pixels
        var = np.maximum(self.squares / self.pixels - mean * mean, 0.0)
        std = tuple(map(float, np.sqrt(var)))
        return ChannelStats(tuple(map(float, mean)), std, self.images, self.pixels, skips, drawn)


def channel_stats(folder: str, data: DataConfig, images: int, seed: int, workers: int = 0) -> ChannelStats:
    """Per-channel mean and std of ``images`` images of ``folder`` drawn with ``seed`` (all if fewer).

    A file that does not decode is skipped and the next one of the seeded order is read instead.
    One line naming the folder when no image of it decodes.
    """
    if images < 1:
        raise DataError(f"--images {images}: must be at least 1")
    return _measure(dataset_from_config(folder, to_unit_array, data), folder, images, seed, workers)


def _measure(dataset, folder: str, images: int, seed: int, workers: int) -> ChannelStats:  # type: ignore[no-untyped-def]
    """``channel_stats`` over a dataset already built from ``folder``."""
    workers = min(workers, len(os.sched_getaffinity(0)))  # more loader processes than cores only contend
    order = _order(dataset, seed)
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
    return moments.result(tuple(log.sorted()), position)


def _order(dataset, seed: int) -> list[int]:  # type: ignore[no-untyped-def]
    return torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()


AUTO_IMAGES = 1000  # read by data.mean=auto: within 0.006 of the 50,000-image mean on CIFAR-10 (docs/domain-data.md)
STATS_CACHE_KIND = "stats-v1"


def resolve_auto_stats(data: DataConfig, seed: int = 0, images: int = AUTO_IMAGES) -> DataConfig:
    """``data`` with ``mean`` / ``std`` measured over a seeded sample of ``data.path`` where they are auto.

    The result is cached beside the file index (``data.index_cache``), keyed by the folder, the
    reading (channels, intensity), the sample's size and seed, and checked against the size and
    modification time of every file the sample read: a changed file measures again.
    """
    if not data.auto_stats:
        return data
    key = json.dumps(
        [
            str(Path(data.path).resolve()),
            data.format,
            data.max_image_pixels,
            images,
            seed,
            data.channels,
            data.intensity,
            data.intensity_percentiles,
            data.intensity_window,
        ]
    )
    cache = cache_path(data.index_cache, STATS_CACHE_KIND, key) if data.index_cache else None
    dataset = dataset_from_config(data.path, to_unit_array, data)  # built once: the cache check and the measure
    stats = _cached_stats(cache, dataset, seed) if cache is not None else None
    if stats is None:
        stats = _measure(dataset, data.path, images, seed, data.num_workers)
        if cache is not None:
            write_cache(cache, _sample_fingerprint(dataset, seed, stats.drawn), [stats.mean, stats.std, stats.drawn])
        logger.info("data.mean / data.std measured over %d images of %s", stats.images, data.path)
    return replace(data, mean=data.mean or stats.mean, std=data.std or stats.std)


def _sample_fingerprint(dataset, seed: int, drawn: int) -> list:  # type: ignore[no-untyped-def]
    """[files listed, hash of (path, size, mtime) of each file the sample read]."""
    order = _order(dataset, seed)[:drawn]
    files = [dataset.item_path(i) for i in order] if hasattr(dataset, "item_path") else dataset.shards
    return [len(dataset), files_digest(str(f) for f in files)]


def _cached_stats(cache: Path, dataset, seed: int) -> ChannelStats | None:  # type: ignore[no-untyped-def]
    entry = read_entry(cache)
    try:
        mean, std, drawn = entry[1] if entry is not None else (None, None, None)
        if mean is None or entry[0] != _sample_fingerprint(dataset, seed, int(drawn)):
            return None
        return ChannelStats(tuple(map(float, mean)), tuple(map(float, std)), 0, 0, (), int(drawn))
    except (TypeError, ValueError):  # a hand-edited or foreign file: measure again
        return None
