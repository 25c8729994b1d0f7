"""Dense probe without a segmentation data set: mosaics of labelled images, one class per tile.

A mosaic is a ``grid x grid`` arrangement of evaluation-transformed images of a labelled
folder; the target of every patch token is the class of the tile it lies in. A linear layer on
the frozen patch tokens has to tell the tiles apart (local features); the same linear layer on
the image's [cls] token, broadcast to every patch, is the baseline that cannot. Tiles are a
whole number of patches wide, so patch-level accuracy and IoU are the pixel-level ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ibot.data.datasets import Sample
from ibot.errors import IBOTError
from ibot.eval.features import encode, require_labels
from ibot.eval.probes import Standardiser, fit_sweep, split_indices, sweep
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime


@dataclass(frozen=True)
class MosaicTokens:
    """Frozen tokens of ``X`` mosaics: patches (X, P, D) fp16, cls (X, D), targets (X, P)."""

    patches: torch.Tensor
    cls: torch.Tensor
    targets: torch.Tensor


@dataclass(frozen=True)
class DenseResult:
    """Probe ``features`` ("patch tokens" or "[cls] broadcast"), lr picked on validation mIoU."""

    features: str
    lr: float
    val_miou: float
    test_miou: float
    test_pixel_accuracy: float
    lr_edge: str | None = None  # "upper" / "lower": the pick is still on that edge of the lrs tried
    extended: int = 0  # lrs tried beyond the configured grid

    def as_dict(self) -> dict[str, float | str | int | None]:
        return dict(self.__dict__)


def make_mosaics(
    dataset: Dataset, count: int, grid: int, patch_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` mosaics (X, C, grid*S, grid*S) of random readable images and their patch targets (X, P)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    tiles: list[Sample] = []
    needed = count * grid * grid
    position = 0  # without replacement while the folder lasts, then round again
    while len(tiles) < needed:
        if position == len(order) and not tiles:
            raise IBOTError("no readable images to build mosaics from")
        sample = dataset[order[position % len(order)]]
        position += 1
        if isinstance(sample, Sample):
            tiles.append(sample)
    size = tiles[0].view.shape[-1]
    if size % patch_size:
        raise IBOTError(f"image size {size} is not a multiple of the patch size {patch_size}")
    cells = size // patch_size
    images, targets = [], []
    for m in range(count):
        group = tiles[m * grid * grid : (m + 1) * grid * grid]
        rows = [torch.cat([s.view for s in group[r * grid : (r + 1) * grid]], dim=2) for r in range(grid)]
        images.append(torch.cat(rows, dim=1))
        labels = torch.tensor([s.label for s in group]).view(grid, grid)
        targets.append(labels.repeat_interleave(cells, 0).repeat_interleave(cells, 1).flatten())
    return torch.stack(images), torch.stack(targets)


@torch.no_grad()
def mosaic_tokens(
    backbone: MaskedViT,
    dataset: Dataset,
    count: int,
    grid: int,
    runtime: Runtime,
    seed: int,
    batch_size: int = 128,
    progress: bool = True,
) -> MosaicTokens:
    """Build ``count`` mosaics from ``dataset`` and run the frozen backbone on them."""
    images, targets = make_mosaics(dataset, count, grid, backbone.patch_size, seed)
    require_labels(targets, "the mosaics' images", "the dense probe")
    backbone = backbone.to(runtime.device).eval()
    parts = [
        encode(backbone, chunk, runtime, patch_dtype=torch.float16)
        for chunk in tqdm(images.split(batch_size), desc="mosaic features", disable=not progress)
    ]
    return MosaicTokens(torch.cat([p.patches for p in parts]), torch.cat([p.cls[:, -1] for p in parts]), targets)


class _PatchLinear(nn.Module):
    """Per-patch class logits (B, P, C) from patch tokens, or from [cls] repeated to every patch."""

    def __init__(self, dim: int, num_classes: int, broadcast_cls: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.broadcast_cls = broadcast_cls

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        if self.broadcast_cls:
            return self.linear(cls[:, -1]).unsqueeze(1).expand(-1, patches.shape[1], -1)
        return self.linear(patches)


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """(mIoU %, pixel accuracy %) over classes present in ``target`` or ``pred``."""
    confusion = torch.bincount(target.flatten() * num_classes + pred.flatten(), minlength=num_classes**2)
    confusion = confusion.view(num_classes, num_classes).double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    miou = float((tp[present] / union[present]).mean()) if bool(present.any()) else 0.0
    return 100.0 * miou, 100.0 * float(tp.sum() / confusion.sum().clamp(min=1))


@torch.no_grad()
def _predict(module: nn.Module, data: MosaicTokens, index: torch.Tensor, standardise: Standardiser) -> torch.Tensor:
    preds = []
    for chunk in index.split(512):
        cls, patches = standardise(data.cls[chunk].unsqueeze(1), data.patches[chunk])
        preds.append(module(cls, patches).argmax(dim=-1))
    return torch.cat(preds)


def train_dense_probes(
    train: MosaicTokens,
    test: MosaicTokens,
    lrs: tuple[float, ...],
    epochs: int,
    batch_size: int,
    val_fraction: float,
    seed: int = 0,
    progress: bool = True,
    max_extensions: int = 3,
) -> list[DenseResult]:
    """Linear per-patch classifiers on patch tokens and on broadcast [cls], every lr, picked on val mIoU.

    Picks on an edge of ``lrs`` extend it, as for the image probes (``ibot.eval.probes.sweep``).
    """
    torch.manual_seed(seed)
    num_classes = int(max(train.targets.max(), test.targets.max())) + 1
    dim = train.patches.shape[-1]
    fit_idx, val_idx = split_indices(len(train.targets), val_fraction, seed)
    standardise = Standardiser.fit(train.cls[fit_idx].unsqueeze(1), train.patches[fit_idx[:1024]])

    def loss_fn(mods: list[nn.Module], idx: torch.Tensor) -> torch.Tensor:
        cls, patches = standardise(train.cls[idx].unsqueeze(1), train.patches[idx])
        target = train.targets[idx].flatten()
        return sum(F.cross_entropy(m(cls, patches).flatten(0, 1), target) for m in mods)

    def val_miou(mods: list[nn.Module]) -> list[float]:
        target = train.targets[val_idx]
        return [segmentation_scores(_predict(m, train, val_idx, standardise), target, num_classes)[0] for m in mods]

    picks = sweep(
        ("patch tokens", "[cls] broadcast"),
        lrs,
        lambda kind: _PatchLinear(dim, num_classes, kind == "[cls] broadcast"),
        lambda mods, rates: fit_sweep(mods, rates, fit_idx, loss_fn, epochs, batch_size, seed, progress),
        val_miou,
        max_extensions,
    )
    all_test = torch.arange(len(test.targets))
    results = []
    for kind, pick in picks.items():
        best = pick.trial
        miou, accuracy = segmentation_scores(
            _predict(best.module, test, all_test, standardise), test.targets, num_classes
        )
        results.append(DenseResult(kind, best.lr, best.score, miou, accuracy, pick.edge, pick.extended))
    return results
