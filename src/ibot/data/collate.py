"""Collate multi-crop samples into a ``Batch`` and draw the patch masks (in the loader workers).

In ``data.pipeline=device`` one batch may hold uint8 crops (8-bit RGB files) and float32 crops
(full-precision files: a 16-bit PNG in a folder of JPEGs); the uint8 ones are then promoted to
float (value / 255), the scale ``ibot.data.photometric`` takes float crops on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

from ibot.config import MaskConfig
from ibot.data.crops import Crops
from ibot.data.datasets import Sample
from ibot.data.masking import build_mask_generator, sample_mask_ratio
from ibot.data.skips import UNREADABLE, Skip


@dataclass(frozen=True)
class Batch:
    """Crops of B images, crop-major: row ``g * B + b`` is global crop g of image b.

    Attributes:
        global_crops: (G*B, C, S, S) float, C = ``data.channels``.
        local_crops: (L*B, C, s, s) float (L may be 0).
        mask: (G*B, N) bool, True where the student sees the [mask] token.
        labels: (B,) int64, -1 when the folder has no classes.
        skipped: the images dropped from this batch, each with its reason.
        mask_indices: (M,) int64 flat indices of ``mask`` (``mask.flatten().nonzero()``), made by
            the collate in the loader workers so the step needs no host sync to gather tokens.
        indices: (B,) int64, the dataset index of each image (what the run reports as decoded);
            it stays on the CPU.
        global_params, local_params: with ``data.pipeline=device``, the crops are not augmented yet
            (uint8, or float in [0, 1] when any file of the batch was read at full precision) and these
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
    """list[Sample | Skip] -> ``Batch`` with one mask per global crop; ``channels``: the crops' C."""

    def __init__(self, mask_cfg: MaskConfig, grid: int, channels: int = 3) -> None:
        self.mask_cfg = mask_cfg
        self.grid = grid
        self.channels = channels
        self.generator = build_mask_generator(mask_cfg, grid)

    def __call__(self, items: list[Sample | Skip | str]) -> Batch | None:
        samples = [s for s in items if isinstance(s, Sample)]
        skipped = skips_of(items)
        if not samples:
            return None if not skipped else Batch(*_empty(self.channels), skipped=skipped)
        crops: list[Crops] = [s.view for s in samples]
        promote = len({c.global_crops.dtype for c in crops}) > 1  # uint8 and float crops in one batch
        global_crops = _crop_major([c.global_crops for c in crops], promote)  # (G*B, C, S, S)
        local_crops = _crop_major([c.local_crops for c in crops], promote)  # (L*B, C, s, s)
        num_global = crops[0].global_crops.shape[0]
        per_image = [self._image_masks(s.seed, num_global) for s in samples]  # B x (G, N)
        mask = torch.stack(per_image, dim=1).flatten(0, 1)  # (G*B, N), crop-major like the crops
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        params = {}
        if crops[0].global_params is not None:  # the crops carry their rows (data.pipeline=device): pass them on
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


def _crop_major(per_image: list[torch.Tensor], promote: bool) -> torch.Tensor:
    """B tensors (K, C, S, S) -> (K*B, C, S, S), row k * B + b; with ``promote``, float32 with uint8 / 255.

    (``torch.stack`` would promote uint8 to float itself, but as 0..255, not on the [0, 1] scale.)
    """
    if promote:
        per_image = [t.float().div_(255) if t.dtype == torch.uint8 else t for t in per_image]
    return torch.stack(per_image, dim=1).flatten(0, 1)


def _empty(channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty(0, channels, 1, 1),
        torch.empty(0, channels, 1, 1),
        torch.empty(0, 1, dtype=torch.bool),
        torch.empty(0, dtype=torch.long),
    )
