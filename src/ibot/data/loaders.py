"""Samplers and DataLoaders: an infinite, resumable, rank-sharded index stream."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from ibot.config import Config
from ibot.data.collate import MultiCropCollate
from ibot.data.datasets import ImageFolder
from ibot.data.transforms import MultiCropTransform


class InfiniteSampler(Sampler[int]):
    """Endless epochs of a seeded permutation; each rank takes a strided slice.

    Epoch ``e`` uses the permutation of ``seed + e``, so the stream is a pure function of
    (seed, rank, world size) and ``start`` (samples this rank already consumed) resumes it
    exactly where a previous run stopped.
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

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.size, generator=g)[self.rank :: self.world_size][: self.per_rank]
            yield from perm[offset:].tolist()
            epoch, offset = epoch + 1, 0


def build_train_loader(
    cfg: Config, rank: int = 0, world_size: int = 1, start_sample: int = 0
) -> tuple[DataLoader, ImageFolder]:
    """Multi-crop, masked pre-training batches over ``cfg.data.path``."""
    dataset = ImageFolder(cfg.data.path, MultiCropTransform(cfg.data))
    grid = cfg.data.global_crop_size // cfg.model.patch_size
    sampler = InfiniteSampler(len(dataset), cfg.train.seed, rank, world_size, start_sample)
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=MultiCropCollate(cfg.mask, grid),
        drop_last=True,
        persistent_workers=cfg.data.num_workers > 0,
        prefetch_factor=4 if cfg.data.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + rank + start_sample),
    )
    return loader, dataset
