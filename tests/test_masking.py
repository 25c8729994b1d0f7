from __future__ import annotations

import random

import pytest
import torch

from ibot.config import MaskConfig
from ibot.data.collate import MultiCropCollate
from ibot.data.datasets import Sample
from ibot.data.masking import BlockMaskGenerator, RandomMaskGenerator, sample_mask_ratio
from ibot.data.transforms import Crops


class TestBlockMaskGenerator:
    @pytest.mark.parametrize("grid, num", [(8, 0), (8, 6), (8, 19), (8, 32), (14, 59), (14, 98)])
    def test_shape_dtype_and_exact_count(self, grid: int, num: int) -> None:
        gen = BlockMaskGenerator(grid, grid, min_block=4)
        for seed in range(20):
            mask = gen(num, random.Random(seed))
            assert mask.shape == (grid, grid) and mask.dtype == torch.bool
            assert int(mask.sum()) == num

    def test_masks_are_blocky(self) -> None:
        # Block masks have far more masked 4-neighbours than random masks of the same size.
        def masked_neighbour_pairs(mask: torch.Tensor) -> int:
            return int((mask[1:] & mask[:-1]).sum() + (mask[:, 1:] & mask[:, :-1]).sum())

        block = BlockMaskGenerator(14, 14)
        rand = RandomMaskGenerator(14, 14)
        b = sum(masked_neighbour_pairs(block(59, random.Random(s))) for s in range(20))
        r = sum(masked_neighbour_pairs(rand(59, random.Random(s))) for s in range(20))
        assert b > 1.5 * r

    def test_seeded_is_reproducible(self) -> None:
        gen = BlockMaskGenerator(8, 8)
        assert torch.equal(gen(20, random.Random(3)), gen(20, random.Random(3)))


def test_random_mask_exact_count() -> None:
    gen = RandomMaskGenerator(4, 6)
    mask = gen(7, random.Random(0))
    assert mask.shape == (4, 6) and int(mask.sum()) == 7


def test_sample_mask_ratio_distribution() -> None:
    cfg = MaskConfig(probability=0.5, ratio=0.3, ratio_var=0.2)
    rng = random.Random(0)
    ratios = [sample_mask_ratio(cfg, rng) for _ in range(4000)]
    masked = [r for r in ratios if r > 0]
    assert 0.45 < len(masked) / len(ratios) < 0.55
    assert min(masked) >= 0.1 and max(masked) <= 0.5
    assert sum(masked) / len(masked) == pytest.approx(0.3, abs=0.01)


def test_collate_builds_crop_major_batch_with_masks() -> None:
    b, grid = 6, 4
    samples = [
        Sample(i, Crops(torch.full((2, 3, 16, 16), float(i)), torch.full((3, 3, 8, 8), float(i))), label=i % 2)
        for i in range(b)
    ]
    random.seed(0)
    batch = MultiCropCollate(MaskConfig(probability=1.0, ratio=0.25, ratio_var=0.0), grid)(samples + ["bad.jpg"])
    assert batch.global_crops.shape == (2 * b, 3, 16, 16)
    assert batch.local_crops.shape == (3 * b, 3, 8, 8)
    # crop-major: row g * B + i is crop g of image i
    assert batch.global_crops[b + 2, 0, 0, 0] == 2.0 and batch.local_crops[2 * b + 5, 0, 0, 0] == 5.0
    assert batch.mask.shape == (2 * b, grid * grid) and batch.mask.dtype == torch.bool
    assert (batch.mask.sum(dim=1) == 4).all()  # 25 % of 16 patches in every crop
    assert batch.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert [s.path for s in batch.skipped] == ["bad.jpg"]
