"""Pictures of what a frozen backbone learned, as PNG files (``ibot visualize ...``).

- ``attention``: the last block's [cls] attention of every head over each image (DINO's figure).
- ``clusters``: k-means of the patch tokens of a set of images, each patch coloured by its
  cluster: the pattern layout of the iBOT paper (parts that recur across images share a colour).
- ``correspondences``: the most similar mutual-nearest-neighbour patch pairs between two images.
- ``pca``: the first three principal components of the patch tokens of a set of images (fitted
  jointly), as RGB; with a threshold on the first component, the background is black and the
  components are fitted again on the foreground patches alone (the DINOv2 figure).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ibot.config import Config
from ibot.data.datasets import Sample
from ibot.data.display import default_channels, to_rgb
from ibot.data.skips import SkipLog
from ibot.errors import IBOTError
from ibot.eval.features import build_eval_dataset, dataset_skips
from ibot.models.vit import MaskedViT

logger = logging.getLogger(__name__)

# Patches per side a picture may have: 4,096 tokens (DINO's attention figures: 480 px at patch
# 8, 60 x 60). Attention costs grow with the square of the token count: --size 4096 at patch 8
# (262,144 tokens) would need a 275 GB attention matrix per head and image.
MAX_GRID = 64


def at_size(cfg: Config, size: int) -> Config:
    """``cfg`` with evaluation images of side ``size`` (0: unchanged).

    The backbone resamples its position embedding to any grid, so pictures can be drawn at a
    larger size than the training crops, where a small patch grid would be hard to read.
    """
    patch = cfg.model.patch_size
    if size == 0:
        return cfg
    if size < patch or size % patch:
        raise IBOTError(f"--size {size}: must be a positive multiple of the patch size {patch}")
    if size // patch > MAX_GRID:
        raise IBOTError(
            f"--size {size}: {size // patch} x {size // patch} patches of {patch} px; at most {MAX_GRID} x {MAX_GRID} "
            f"(--size {MAX_GRID * patch}): attention time and memory grow with the square of the patch count"
        )
    return replace(cfg, eval=replace(cfg.eval, image_size=size))


def picture_path(output: str, kind: str, default_folder: Path) -> Path:
    """Where ``ibot visualize KIND`` writes: ``--output`` as a .png file, ``KIND.png`` in the folder
    it names (an existing one, or a path ending in a separator), or ``default_folder/KIND.png``."""
    if not output:
        return default_folder / f"{kind}.png"
    path = Path(output)
    if path.is_dir() or output.endswith(("/", os.sep)):
        return path / f"{kind}.png"
    if path.suffix.lower() != ".png":  # matplotlib would add ".png" itself, or write another format
        raise IBOTError(f"--output {output}: must be a .png file or a folder")
    return path


def image_folder(images: str, cfg: Config) -> str:
    """``--images``, else the run's ``eval.test_path``, named as such when it is missing."""
    if images:
        return images
    folder = cfg.eval.test_path
    if not folder:
        raise IBOTError("--images: no folder given and the run's config has no eval.test_path")
    if not Path(folder).exists():
        raise IBOTError(f"eval.test_path={folder} (the run's config): path does not exist; give --images")
    return folder


def spread_images(folder: str, cfg: Config, count: int, skips: SkipLog | None = None) -> torch.Tensor:
    """``count`` readable images spread evenly over ``folder``'s sorted list (so over its classes).

    A pick that does not decode is replaced by the next readable image after it (wrapping
    around), so ``count`` images are drawn whenever the folder has that many; fewer is said in
    one line. What the scan and the decoding left out goes into ``skips`` (when none is
    readable: into the error line, counted per reason).
    """
    dataset = build_eval_dataset(folder, cfg)
    n = len(dataset)
    picks = torch.linspace(0, n - 1, min(count, n)).round().long().unique().tolist()
    tried: set[int] = set()
    samples: list[Sample] = []
    for pick in picks:
        sample = _next_readable(dataset, pick, tried)
        if sample is None:  # every file tried
            break
        samples.append(sample)
    if not samples:  # the counts per reason in the line itself: a refusal writes no list
        raise IBOTError(f"{folder}: no readable images to draw; {dataset_skips(dataset).summary('visualize')}")
    if skips is not None:
        skips.extend(dataset_skips(dataset))
    if len(samples) < count:
        logger.warning(
            "%s: %d readable images, fewer than the %d asked for: drawing those",
            folder,
            len(samples),
            count,
        )
    samples.sort(key=lambda s: s.index)  # the folder's order, substitutes included
    return torch.stack([s.view for s in samples])


def _next_readable(dataset, start: int, tried: set[int]) -> Sample | None:  # type: ignore[no-untyped-def]
    """The first readable image of ``dataset`` from index ``start`` on (then from 0) not in ``tried``."""
    n = len(dataset)
    for i in (j % n for j in range(start, start + n)):
        if i in tried:
            continue
        tried.add(i)
        sample = dataset[i]
        if isinstance(sample, Sample):
            return sample
    return None


def to_pixels(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], channels: tuple[int, ...] = ()
) -> torch.Tensor:
    """Normalised (B, C, S, S) -> (B, S, S, 3) in [0, 1] for imshow: the ``channels`` drawn as RGB,
    one drawn grey (``ibot.data.display``; () = the first three, or the first in grey)."""
    c = images.shape[1]
    pixels = (images * torch.tensor(std).view(1, c, 1, 1) + torch.tensor(mean).view(1, c, 1, 1)).clamp(0, 1)
    return to_rgb(pixels.permute(0, 2, 3, 1), channels or default_channels(c))


def cls_attention(backbone: MaskedViT, images: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w): how much the last block's [cls] query attends to each patch, per head."""
    attention = backbone.last_attention(images)[:, :, 0, backbone.vit.num_prefix_tokens :]
    grid = images.shape[-1] // backbone.patch_size
    return attention.reshape(*attention.shape[:2], grid, grid)


def kmeans(points: torch.Tensor, k: int, iterations: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (cosine) of (X, D) points -> (assignments (X,), centroids (k, D)).

    k-means++ seeding; an emptied cluster is re-seeded at the point farthest from its centroid.
    """
    x = F.normalize(points.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=g)]
    while len(centroids) < k:
        distance = (1 - (x @ centroids.t()).max(dim=1).values).clamp(min=0)
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        centroids = torch.cat([centroids, x[torch.multinomial(weights, 1, generator=g)]])
    for _ in range(iterations):
        similarity = x @ centroids.t()
        assign = similarity.argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        farthest = similarity.max(dim=1).values.argmin()
        new = torch.where(counts.unsqueeze(1) > 0, F.normalize(sums, dim=-1), x[farthest].expand_as(centroids))
        if torch.allclose(new, centroids):
            break
        centroids = new
    return (x @ centroids.t()).argmax(dim=1), centroids


def mutual_neighbours(a: torch.Tensor, b: torch.Tensor, pairs: int) -> list[tuple[int, int, float]]:
    """Patch pairs (i in a, j in b, cosine) that are each other's nearest neighbour, best first."""
    sim = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t()
    best_b, best_a = sim.argmax(dim=1), sim.argmax(dim=0)
    mutual = [(i, int(j), float(sim[i, j])) for i, j in enumerate(best_b.tolist()) if int(best_a[j]) == i]
    return sorted(mutual, key=lambda t: -t[2])[:pairs]


def principal_scores(points: torch.Tensor, k: int = 3) -> torch.Tensor:
    """(X, D) -> (X, k): projections of the centred points on their top-``k`` principal axes.

    The eigenvectors of the (D, D) scatter matrix, in float64: deterministic up to each axis's
    sign, which is fixed so that the largest projection in magnitude is positive (sklearn's
    ``svd_flip``), so negating every feature gives the same scores. Axes beyond D score 0.
    """
    x = points.double() - points.double().mean(dim=0)
    _, vectors = torch.linalg.eigh(x.t() @ x)  # ascending eigenvalues
    scores = x @ vectors[:, -k:].flip(1)
    signs = scores.gather(0, scores.abs().argmax(dim=0, keepdim=True)).sign()
    scores = scores * torch.where(signs == 0, 1.0, signs)
    return F.pad(scores, (0, k - scores.shape[1])).float()


def centre_mask(height: int, width: int) -> torch.Tensor:
    """(height * width,) bool: the patches of the middle half of the grid in each direction."""
    rows = (torch.arange(height) >= height // 4) & (torch.arange(height) < height - height // 4)
    cols = (torch.arange(width) >= width // 4) & (torch.arange(width) < width - width // 4)
    return (rows[:, None] & cols[None, :]).flatten()


def centre_positive(first: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``first`` (X,) negated if needed so its mean over ``centre`` patches exceeds the rest's.

    The foreground convention: object-centred photos (CIFAR-10, ImageNet) have their object
    in the middle, so the side of the first component the centre leans to is the foreground.
    """
    if bool(centre.all()) or not bool(centre.any()):
        return first
    return first if first[centre].mean() >= first[~centre].mean() else -first


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Each column of (X, C) scaled to [0, 1] over its X values."""
    low, high = x.min(dim=0).values, x.max(dim=0).values
    return (x - low) / (high - low).clamp(min=1e-12)


def pca_colours(patches: torch.Tensor, height: int, width: int, threshold: float | None = None) -> torch.Tensor:
    """(B, N = height * width, D) patch tokens -> (B, height, width, 3) RGB in [0, 1].

    The three components of all B * N patches together, each min-max scaled over the set, the
    first oriented by ``centre_positive``. With ``threshold``: the patches whose scaled first
    component exceeds it are the foreground, coloured by three components fitted on them alone;
    the rest are black.
    """
    b = patches.shape[0]
    points = patches.flatten(0, 1)
    centre = centre_mask(height, width).repeat(b)
    scores = principal_scores(points)
    scores[:, 0] = centre_positive(scores[:, 0], centre)
    if threshold is None:
        return min_max(scores).view(b, height, width, 3)
    foreground = min_max(scores[:, :1]).squeeze(1) > threshold
    if int(foreground.sum()) < 3:
        raise IBOTError(f"--threshold {threshold:g}: {int(foreground.sum())} foreground patches, need 3; lower it")
    inner = principal_scores(points[foreground])
    inner[:, 0] = centre_positive(inner[:, 0], centre[foreground])
    rgb = torch.zeros(len(points), 3)
    rgb[foreground] = min_max(inner)
    return rgb.view(b, height, width, 3)


def _figure(rows: int, cols: int, scale: float = 1.4):  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(scale * cols, scale * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return plt, fig, axes


def save_figure(plt, fig, path: str | Path, title: str, dpi: int = 110) -> Path:  # type: ignore[no-untyped-def]
    """Title, tight layout, PNG at ``path`` (folders made), figure closed."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


@torch.no_grad()
def draw_attention(
    backbone: MaskedViT, images: torch.Tensor, cfg: Config, path: str | Path, channels: tuple[int, ...] = ()
) -> Path:
    """One row per image: the image (its ``channels`` as RGB), then its [cls] attention map for every head."""
    maps = cls_attention(backbone, images)
    pixels = to_pixels(images, cfg.data.mean, cfg.data.std, channels)
    plt, fig, axes = _figure(len(images), 1 + maps.shape[1])
    for i in range(len(images)):
        axes[i, 0].imshow(pixels[i].numpy())
        for h in range(maps.shape[1]):
            axes[i, 1 + h].imshow(maps[i, h].numpy(), cmap="inferno")
            if i == 0:
                axes[i, 1 + h].set_title(f"head {h}", fontsize=8)
    return save_figure(plt, fig, path, "last-block [cls] attention per head")


@torch.no_grad()
def draw_clusters(
    backbone: MaskedViT, images: torch.Tensor, cfg: Config, path: str | Path, k: int, channels: tuple[int, ...] = ()
) -> Path:
    """Images in pairs of rows: the image above, its patches coloured by k-means cluster below."""
    import matplotlib

    patches = backbone(images).patches  # (B, N, D)
    assign, _ = kmeans(patches.flatten(0, 1), k)
    grid = images.shape[-1] // backbone.patch_size
    layout = assign.view(len(images), grid, grid)
    pixels = to_pixels(images, cfg.data.mean, cfg.data.std, channels)
    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    plt, fig, axes = _figure(2 * rows, cols)
    colours = matplotlib.colormaps["tab20"].resampled(max(k, 2))
    for i in range(len(images)):
        r, c = divmod(i, cols)
        axes[2 * r, c].imshow(pixels[i].numpy())
        axes[2 * r + 1, c].imshow(layout[i].numpy(), cmap=colours, vmin=0, vmax=max(k - 1, 1))
    return save_figure(plt, fig, path, f"patch tokens, k-means into {k} clusters shared by all images")


@torch.no_grad()
def draw_correspondences(
    backbone: MaskedViT,
    images: torch.Tensor,
    cfg: Config,
    path: str | Path,
    pairs: int,
    channels: tuple[int, ...] = (),
) -> Path:
    """The first two images side by side, lines between their best mutual-nearest patch pairs."""
    if len(images) < 2:
        raise IBOTError("correspondences need two readable images")
    patches = backbone(images[:2]).patches
    matches = mutual_neighbours(patches[0], patches[1], pairs)
    pixels = to_pixels(images[:2], cfg.data.mean, cfg.data.std, channels)
    size, p = images.shape[-1], backbone.patch_size
    grid = size // p
    plt, fig, axes = _figure(1, 1, scale=3.0)
    ax = axes[0, 0]
    ax.imshow(torch.cat([pixels[0], pixels[1]], dim=1).numpy())
    colours = plt.get_cmap("rainbow")
    for n, (i, j, _) in enumerate(matches):
        (ya, xa), (yb, xb) = divmod(i, grid), divmod(j, grid)
        colour = colours(n / max(len(matches) - 1, 1))
        ax.plot([xa * p + p / 2, size + xb * p + p / 2], [ya * p + p / 2, yb * p + p / 2], color=colour, lw=1)
    return save_figure(plt, fig, path, f"{len(matches)} best mutual-nearest patch pairs")


@torch.no_grad()
def draw_pca(
    backbone: MaskedViT,
    images: torch.Tensor,
    cfg: Config,
    path: str | Path,
    threshold: float | None = None,
    channels: tuple[int, ...] = (),
) -> Path:
    """Each image with its patches coloured by the first three principal components (RGB), four pairs a row."""
    if threshold is not None and not 0 <= threshold < 1:
        raise IBOTError(f"--threshold {threshold:g}: must be in [0, 1) (the first component is scaled to [0, 1])")
    patches = backbone(images).patches
    height, width = (side // backbone.patch_size for side in images.shape[-2:])
    colours = pca_colours(patches, height, width, threshold)
    pixels = to_pixels(images, cfg.data.mean, cfg.data.std, channels)
    pairs = min(4, len(images))
    rows = -(-len(images) // pairs)
    plt, fig, axes = _figure(rows, 2 * pairs)
    for i in range(len(images)):
        r, c = divmod(i, pairs)
        axes[r, 2 * c].imshow(pixels[i].numpy())
        axes[r, 2 * c + 1].imshow(colours[i].numpy(), interpolation="nearest")
    where = "all patches" if threshold is None else f"foreground patches (first component > {threshold:g})"
    return save_figure(plt, fig, path, f"patch tokens: first 3 principal components of {where} as RGB")
