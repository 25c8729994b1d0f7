"""Image folders: recursive file index, class sub-folders as labels, robust decoding.

An unreadable image never crashes a run: ``__getitem__`` returns ``None`` for it and the
collate function counts it, so the trainer can report every skipped file once at the end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ibot.data.index_cache import cache_path, read_cache, write_cache
from ibot.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def transform_seeded(transform: Callable[[Image.Image], Any], image: Image.Image, seed: int | None) -> Any:
    """Apply ``transform``; with a seed, its random draws depend on that seed alone."""
    if seed is None:
        return transform(image)
    # torchvision draws from the global torch RNG: fork it so the seed is this image's alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def load_rgb(path: str | Path | IO[bytes]) -> Image.Image:
    """Open any PIL-readable image as 8-bit RGB (grayscale, RGBA, CMYK, palette, 16-bit)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            # PIL's own convert() clips 16-bit and float data to 0..255; rescale by the range instead.
            arr = np.asarray(img, dtype=np.float32)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
            return Image.fromarray(arr, mode="L").convert("RGB")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            # Composite on black: the same as what an RGB decoder shows for transparent pixels.
            background = Image.new("RGB", img.size, (0, 0, 0))
            background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
            return background
        return img.convert("RGB")


def _fingerprint(root: Path) -> list[list]:
    """Modification times of ``root`` and its direct sub-folders: what adding a class or file changes."""
    entries = [["", root.stat().st_mtime_ns]]
    with os.scandir(root) as it:
        for entry in it:
            if entry.is_dir():
                entries.append([entry.name, entry.stat().st_mtime_ns])
    return sorted(entries)


def _walk_images(root: Path) -> list[str]:
    """Image paths relative to ``root``, sorted; os.walk is several times faster than Path.rglob."""
    found = []
    for folder, _, files in os.walk(root, followlinks=True):
        rel = os.path.relpath(folder, root)
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if rel == "." else os.path.join(rel, name))
    return sorted(found)


@dataclass(frozen=True)
class ImageFolderIndex:
    """Sorted image paths under a root with a label per path (-1 when there are no class folders)."""

    root: Path
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    @staticmethod
    def scan(root: str | Path, cache_dir: str | Path | None = None) -> ImageFolderIndex:
        """Index ``root``; with ``cache_dir`` the file list is reused while the folder is unchanged.

        The cache is keyed by the absolute path and checked against the modification times of
        the folder and its direct sub-folders (class folders), so a start over millions of
        files does not re-list them.
        """
        root = Path(root)
        if not root.exists():
            raise DataError(f"{root}: path does not exist")
        if not root.is_dir():
            raise DataError(f"{root}: not a directory")
        relative = None
        if cache_dir:
            cache_file = cache_path(cache_dir, "index", str(root.resolve()))
            fingerprint = _fingerprint(root)
            relative = read_cache(cache_file, fingerprint)
        if relative is None:
            relative = _walk_images(root)
            if cache_dir and relative:
                write_cache(cache_file, fingerprint, relative)
        if not relative:
            raise DataError(f"{root}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        parts = [r.split(os.sep) for r in relative]
        top = sorted({p[0] for p in parts if len(p) > 1})
        class_to_idx = {name: i for i, name in enumerate(top)}
        labels = tuple(class_to_idx[p[0]] if len(p) > 1 else -1 for p in parts)
        return ImageFolderIndex(root, tuple(str(root / r) for r in relative), labels, tuple(top))


@dataclass(frozen=True)
class Sample:
    """One decoded, transformed image; ``view`` is whatever the transform returned.

    ``seed`` (from the sampler) fixed the image's augmentation and seeds its masks, so a
    sample looks the same whichever worker, process or resumed run produces it.
    """

    index: int
    view: Any
    label: int
    seed: int | None = None


class ImageFolder(Dataset):
    """Images under ``root`` (recursive); unreadable files yield ``None`` instead of raising."""

    def __init__(
        self, root: str | Path, transform: Callable[[Image.Image], Any], index_cache: str | Path | None = None
    ) -> None:
        self.index = ImageFolderIndex.scan(root, index_cache)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index.paths)

    @property
    def labels(self) -> tuple[int, ...]:
        return self.index.labels

    @property
    def classes(self) -> tuple[str, ...]:
        return self.index.classes

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | str:
        """``key`` is an index, or (index, seed) from ``InfiniteSampler`` for seeded augmentation."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        path = self.index.paths[i]
        try:
            image = load_rgb(path)
        except Exception:  # noqa: BLE001 - any decoder failure means "unreadable", never a crash
            return path  # the collate function counts it as skipped
        return Sample(
            index=i, view=transform_seeded(self.transform, image, seed), label=self.index.labels[i], seed=seed
        )
