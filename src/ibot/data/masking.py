"""Mask generators: patch grid (H, W) + target count -> bool mask (True = masked).

``BlockMaskGenerator`` places random rectangles as BEiT/iBOT do; ``RandomMaskGenerator``
masks uniformly chosen patches. ``sample_mask_ratio`` draws iBOT's per-crop ratio: with
probability 1 - p the crop is left unmasked, else ratio ~ U(ratio - var, ratio + var).
Python's ``random`` is used on purpose: DataLoader seeds it per worker, so masks are
reproducible and generated in the workers, off the training step.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from ibot.config import MaskConfig


class BlockMaskGenerator:
    """BEiT-style block masking: rectangles of area >= ``min_block`` and aspect in [0.3, 1/0.3]."""

    def __init__(self, height: int, width: int, min_block: int = 4, max_block: int | None = None) -> None:
        self.height, self.width = height, width
        self.min_block = min_block
        self.max_block = max_block if max_block is not None else max(min_block, height * width // 2)
        self.log_aspect = (math.log(0.3), math.log(1 / 0.3))

    def _place_block(self, mask: np.ndarray, budget: int, rng: random.Random) -> int:
        """Try up to 10 rectangles; mask the first that adds 1..budget new patches."""
        for _ in range(10):
            area = rng.uniform(self.min_block, max(self.min_block, budget))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h <= self.height and 1 <= w <= self.width):
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            window = mask[top : top + h, left : left + w]
            added = h * w - int(window.sum())
            if 0 < added <= budget:
                window[...] = True
                return added
        return 0

    def __call__(self, num_masked: int, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random.Random(random.getrandbits(64))
        # numpy, not torch: a block costs a few small-array ops, ~10x cheaper in numpy
        # (the masks of a 224 px crop took 0.4 ms per crop with torch tensors).
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masked:
            added = self._place_block(mask, min(num_masked - count, self.max_block), rng)
            if added == 0:
                # Small leftovers cannot fit a minimum-size block: top up with single patches
                # so the realised ratio matches the request instead of silently falling short.
                free = np.flatnonzero(~mask).tolist()
                for idx in rng.sample(free, min(num_masked - count, len(free))):
                    mask.flat[idx] = True
                break
            count += added
        return torch.from_numpy(mask)


class RandomMaskGenerator:
    """Masks ``num_masked`` patches chosen uniformly without replacement."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width

    def __call__(self, num_masked: int, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random.Random(random.getrandbits(64))
        mask = torch.zeros(self.height * self.width, dtype=torch.bool)
        mask[rng.sample(range(self.height * self.width), num_masked)] = True
        return mask.view(self.height, self.width)


def build_mask_generator(cfg: MaskConfig, grid: int) -> BlockMaskGenerator | RandomMaskGenerator:
    if cfg.mode == "block":
        return BlockMaskGenerator(grid, grid, min_block=cfg.min_block_patches)
    return RandomMaskGenerator(grid, grid)


def sample_mask_ratio(cfg: MaskConfig, rng: random.Random) -> float:
    """iBOT's per-crop ratio: 0 with probability 1 - ``probability``, else U(ratio +/- var)."""
    if rng.random() >= cfg.probability:
        return 0.0
    return rng.uniform(cfg.ratio - cfg.ratio_var, cfg.ratio + cfg.ratio_var)
