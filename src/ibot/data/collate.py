"""Collate multi-crop samples into a ``Batch`` and draw the patch masks (in the loader workers)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

from ibot.config import MaskConfig
from ibot.data.datasets import Sample
from ibot.data.masking import build_mask_generator, sample_mask_ratio
from ibot.data.skips import UNREADABLE, Skip
from ibot.data.transforms import Crops


@dataclass(frozen=True)
class Batch:
    """Crops of B images, crop-major: row ``g * B + b`` is global crop g of image b.

    Attributes:
        global_crops: (G*B, 3, S, S) float.
        local_crops: (L*B, 3, s, s) float (L may be 0).
        mask: (G*B, N) bool, True where the student sees the [mask] token.
        labels: (B,) int64, -1 when the folder has no classes.
        skipped: the images dropped from this batch, each with its reason.
        mask_indices: (M,) int64 flat indices of ``mask`` (``mask.flatten().nonzero()``), made by
            the collate in the loader workers so the step needs no host sync to gather tokens.
        indices: (B,) int64, the dataset index of each image (what the run reports as decoded);
            it stays on the CPU.
        global_params, local_params: with ``data.pipeline=device``, the crops are uint8 and these
            hold each crop's augmentation parameters, crop-major like the crops; they stay on
            the CPU (``to`` leaves them) until ``ibot.data.photometric.DeviceAugment`` applies them.
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    skipped: tuple[Skip, ...] = field(default_factory=tuple)
    mask_indices: torch.Tensor | None = None
    global_params: torch.Tensor | None = None
    local_params: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def masked_indices(self) -> torch.Tensor:
        """Flat indices of the masked patches in (G*B*N) order."""
        if self.mask_indices is not None:
            return self.mask_indices
        return self.mask.flatten().nonzero().flatten()

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return replace(
            self,
            global_crops=self.global_crops.to(device, non_blocking=non_blocking),
            local_crops=self.local_crops.to(device, non_blocking=non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            mask_indices=None if self.mask_indices is None else self.mask_indices.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        return replace(
            self,
            global_crops=self.global_crops.pin_memory(),
            local_crops=self.local_crops.pin_memory(),
            mask=self.mask.pin_memory(),
            labels=self.labels.pin_memory(),
            mask_indices=None if self.mask_indices is None else self.mask_indices.pin_memory(),
        )


class MultiCropCollate:
    """list[Sample | Skip] -> ``Batch`` with one mask per global crop."""

    def __init__(self, mask_cfg: MaskConfig, grid: int) -> None:
        self.mask_cfg = mask_cfg
        self.grid = grid
        self.generator = build_mask_generator(mask_cfg, grid)

    def __call__(self, items: list[Sample | Skip | str]) -> Batch | None:
        samples = [s for s in items if isinstance(s, Sample)]
        skipped = skips_of(items)
        if not samples:
            return None if not skipped else Batch(*_empty(), skipped=skipped)
        crops: list[Crops] = [s.view for s in samples]
        global_crops = torch.stack([c.global_crops for c in crops], dim=1).flatten(0, 1)  # (G*B, 3, S, S)
        local_crops = torch.stack([c.local_crops for c in crops], dim=1).flatten(0, 1)  # (L*B, 3, s, s)
        num_global = crops[0].global_crops.shape[0]
        per_image = [self._image_masks(s.seed, num_global) for s in samples]  # B x (G, N)
        mask = torch.stack(per_image, dim=1).flatten(0, 1)  # (G*B, N), crop-major like the crops
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        params = {}
        if crops[0].global_params is not None:
            params = {
                "global_params": torch.stack([c.global_params for c in crops], dim=1).flatten(0, 1),
                "local_params": torch.stack([c.local_params for c in crops], dim=1).flatten(0, 1),
            }
        indices = torch.tensor([s.index for s in samples], dtype=torch.long)
        return Batch(
            global_crops,
            local_crops,
            mask,
            labels,
            skipped,
            mask.flatten().nonzero().flatten(),
            **params,
            indices=indices,
        )

    def _image_masks(self, seed: int | None, num_global: int) -> torch.Tensor:
        """(G, N) masks of one image, from its own seed when it has one."""
        rng = random.Random(seed if seed is not None else random.getrandbits(64))
        n = self.grid * self.grid
        return torch.stack(
            [
                self.generator(int(round(sample_mask_ratio(self.mask_cfg, rng) * n)), rng).flatten()
                for _ in range(num_global)
            ]
        )


def skips_of(items: list) -> tuple[Skip, ...]:
    """The skips among a batch's items; a bare path (a dataset of another kind) counts as unreadable."""
    return tuple(s if isinstance(s, Skip) else Skip(s, UNREADABLE) for s in items if isinstance(s, (Skip, str)))


def _empty() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty(0, 3, 1, 1),
        torch.empty(0, 3, 1, 1),
        torch.empty(0, 1, dtype=torch.bool),
        torch.empty(0, dtype=torch.long),
    )
