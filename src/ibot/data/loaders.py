"""Samplers and DataLoaders: an infinite, resumable, rank-sharded index stream."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ibot.config import Config, DataConfig, MaskConfig
from ibot.data.collate import MultiCropCollate
from ibot.data.datasets import IMAGE_EXTENSIONS, ImageFolder
from ibot.data.decode import DEFAULT_MAX_PIXELS
from ibot.data.pipeline import Pipeline, build_pipeline
from ibot.data.reading import RGB8, Reading
from ibot.data.shards import TarShards


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image ``index`` in ``epoch``: deterministic, distinct per draw."""
    return hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF


class InfiniteSampler(Sampler[tuple[int, int]]):
    """Endless epochs of a seeded permutation; each rank takes a strided slice.

    Yields (index, sample seed). Epoch ``e`` uses the permutation of ``seed + e``, so the
    stream is a pure function of (seed, rank, world size), ``start`` (samples this rank
    already consumed) resumes it exactly, and the ranks of a run with global batch B see
    the same images, augmented the same way, as one process with batch B.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = size // world_size
        if self.per_rank == 0:
            raise ValueError(f"dataset of {size} images is smaller than the world size {world_size}")
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.size, generator=g)[: self.per_rank * self.world_size]
            for index in perm[self.rank :: self.world_size][offset:].tolist():
                yield index, sample_seed(self.seed, epoch, index)
            epoch, offset = epoch + 1, 0


def build_dataset(
    path: str,
    transform: Any,
    data_format: str = "auto",
    index_cache: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reading: Reading = RGB8,
) -> Dataset:
    """An image folder, or tar shards when ``data_format`` says so (auto: a .tar file or a folder of them).

    Either has ``skips`` (a ``SkipLog``) and yields a ``Skip`` for an image it cannot use.
    """
    if data_format == "auto":
        p = Path(path)
        is_shards = p.suffix == ".tar" or (
            p.is_dir()
            and any(p.glob("*.tar"))
            and not any(c.is_dir() or c.suffix.lower() in IMAGE_EXTENSIONS for c in p.iterdir())
        )
        data_format = "shards" if is_shards else "folder"
    if data_format == "shards":
        return TarShards(path, transform, index_cache, max_pixels, reading)
    return ImageFolder(path, transform, index_cache, max_pixels, reading)


def dataset_from_config(path: str, transform: Any, data: DataConfig) -> Dataset:
    """``build_dataset`` with the format, index cache, pixel limit and reading of ``data``."""
    return build_dataset(
        path, transform, data.format, data.index_cache, data.max_image_pixels, Reading.from_config(data)
    )


def listed_images(data: DataConfig) -> int:
    """How many image files ``data.path`` lists (its scan or shard index; nothing is decoded)."""
    return len(dataset_from_config(data.path, None, data))


def training_mask_config(cfg: Config) -> MaskConfig:
    """``cfg.mask``, except that plain DINO (``mim.target=none``) masks nothing: no patch loss."""
    return replace(cfg.mask, probability=0.0) if cfg.mim.target == "none" else cfg.mask


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker's ``worker_init_fn``: SIGTERM is the main process's to handle.

    SLURM and ``kill -- -PGID`` send SIGTERM to every process of the job; a worker that died of
    it would make the main process raise instead of finishing its step and saving. The main
    process shuts its workers down, and a worker whose parent is gone exits by itself.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_train_loader(
    cfg: Config, rank: int = 0, world_size: int = 1, start_sample: int = 0, pipeline: Pipeline | None = None
) -> tuple[DataLoader, Dataset]:
    """Multi-crop, masked pre-training batches over ``cfg.data.path``.

    The workers apply ``pipeline.cpu_transform`` (built from ``cfg.data`` when not given); the
    batches are finished by its ``device_step`` (``ibot.data.pipeline``) on the training device.
    """
    pipeline = pipeline or build_pipeline(cfg.data)
    dataset = dataset_from_config(cfg.data.path, pipeline.cpu_transform, cfg.data)
    grid = cfg.data.global_crop_size // cfg.model.patch_size
    sampler = InfiniteSampler(len(dataset), cfg.train.seed, rank, world_size, start_sample)
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=MultiCropCollate(training_mask_config(cfg), grid, cfg.data.channels),
        drop_last=True,
        persistent_workers=cfg.data.num_workers > 0,
        worker_init_fn=ignore_stop_signals,
        prefetch_factor=4 if cfg.data.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + rank + start_sample),
    )
    return loader, dataset
