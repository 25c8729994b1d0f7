"""The mosaic dense probe: mosaics and targets line up, scores are right, local features win."""

from __future__ import annotations

import pytest
import torch

from ibot.data.datasets import Sample
from ibot.eval.dense import MosaicTokens, make_mosaics, segmentation_scores, train_dense_probes


class ColourFolder(torch.utils.data.Dataset):
    """Image i is a flat 8x8 image of value ``label``; every third one is unreadable."""

    def __init__(self, size: int = 30, classes: int = 3) -> None:
        self.labels = [i % classes for i in range(size)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Sample | str:
        if i % 3 == 2:
            return f"broken_{i}.jpg"
        return Sample(index=i, view=torch.full((3, 8, 8), float(self.labels[i])), label=self.labels[i])


def test_mosaic_targets_follow_the_tiles() -> None:
    images, targets = make_mosaics(ColourFolder(), count=5, grid=2, patch_size=4, seed=0)
    assert images.shape == (5, 3, 16, 16) and targets.shape == (5, 16)  # 4 x 4 patches of 4 px
    # each patch's target is the value of the pixels it covers
    patch_values = images[:, 0].unfold(1, 4, 4).unfold(2, 4, 4).mean(dim=(-1, -2)).flatten(1)
    assert torch.equal(patch_values.long(), targets)
    assert set(targets.unique().tolist()) <= {0, 1}  # label 2 images are the unreadable ones


def test_segmentation_scores_hand_computed() -> None:
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 1, 1, 1])
    miou, accuracy = segmentation_scores(pred, target, num_classes=3)
    # class 0: IoU 1/2, class 1: IoU 2/3, class 2 absent from both
    assert miou == pytest.approx(100 * (1 / 2 + 2 / 3) / 2) and accuracy == pytest.approx(75.0)


def _synthetic(num: int, seed: int, classes: int = 4, dim: int = 12) -> MosaicTokens:
    """2x2 tiles of 2x2 patches; each patch token points along its tile's class; [cls] is noise."""
    g = torch.Generator().manual_seed(seed)
    tile_labels = torch.randint(0, classes, (num, 2, 2), generator=g)
    targets = tile_labels.repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1)  # (X, 16)
    directions = torch.eye(dim)[:classes]
    patches = 3 * directions[targets] + torch.randn(num, 16, dim, generator=g)
    return MosaicTokens(patches.half(), torch.randn(num, dim, generator=g), targets)


def test_patch_tokens_segment_where_the_cls_token_cannot() -> None:
    results = {
        r.features: r
        for r in train_dense_probes(_synthetic(400, 0), _synthetic(100, 1), (1e-2,), 10, 32, 0.2, progress=False)
    }
    assert results["patch tokens"].test_miou > 85 and results["patch tokens"].test_pixel_accuracy > 90
    assert results["[cls] broadcast"].test_miou < 30
