"""Where the attention-pooling probe looks: its pooling weights over a few test images, as a PNG."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ibot.data.datasets import Sample
from ibot.eval.features import encode
from ibot.eval.probes import ProbeResult
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime


@torch.no_grad()
def save_attention_pool_maps(
    result: ProbeResult,
    backbone: MaskedViT,
    dataset: Dataset,
    runtime: Runtime,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    path: str | Path,
    count: int = 8,
) -> Path:
    """The first ``count`` readable images of ``dataset``, each above its pooling-weight heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in (dataset[i] for i in range(min(len(dataset), 4 * count))) if isinstance(s, Sample)][:count]
    images = torch.stack([s.view for s in samples])
    encoded = encode(backbone.to(runtime.device).eval(), images, runtime, patch_dtype=torch.float32)
    cls, patches = result.standardise(encoded.cls, encoded.patches)
    weights = result.module.attention(patches)  # (B, N)
    grid = images.shape[-1] // backbone.patch_size
    maps = F.interpolate(weights.view(-1, 1, grid, grid), size=images.shape[-2:], mode="nearest")[:, 0]
    from ibot.visualize import save_figure, to_pixels

    pixels = to_pixels(images, mean, std)
    fig, axes = plt.subplots(2, len(samples), figsize=(1.6 * len(samples), 3.4), squeeze=False)
    for i in range(len(samples)):
        axes[0, i].imshow(pixels[i].numpy())
        axes[1, i].imshow(maps[i].numpy(), cmap="inferno")
        for ax in axes[:, i]:
            ax.axis("off")
    return save_figure(plt, fig, path, "attention-pool weights (bright = counts more)", dpi=100)
