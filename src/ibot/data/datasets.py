"""Image folders: recursive file index, class sub-folders as labels, robust decoding.

An unreadable image never crashes a run: ``__getitem__`` returns ``None`` for it and the
collate function counts it, so the trainer can report every skipped file once at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ibot.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def load_rgb(path: str | Path) -> Image.Image:
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


@dataclass(frozen=True)
class ImageFolderIndex:
    """Sorted image paths under a root with a label per path (-1 when there are no class folders)."""

    root: Path
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    @staticmethod
    def scan(root: str | Path) -> ImageFolderIndex:
        root = Path(root)
        if not root.exists():
            raise DataError(f"{root}: path does not exist")
        if not root.is_dir():
            raise DataError(f"{root}: not a directory")
        files = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            raise DataError(f"{root}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        top = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        class_to_idx = {name: i for i, name in enumerate(top)}
        labels = []
        for p in files:
            parts = p.relative_to(root).parts
            labels.append(class_to_idx[parts[0]] if len(parts) > 1 else -1)
        return ImageFolderIndex(root, tuple(str(p) for p in files), tuple(labels), tuple(top))


@dataclass(frozen=True)
class Sample:
    """One decoded, transformed image; ``view`` is whatever the transform returned."""

    index: int
    view: Any
    label: int


class ImageFolder(Dataset):
    """Images under ``root`` (recursive); unreadable files yield ``None`` instead of raising."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any]) -> None:
        self.index = ImageFolderIndex.scan(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index.paths)

    @property
    def labels(self) -> tuple[int, ...]:
        return self.index.labels

    @property
    def classes(self) -> tuple[str, ...]:
        return self.index.classes

    def __getitem__(self, i: int) -> Sample | str:
        path = self.index.paths[i]
        try:
            image = load_rgb(path)
        except Exception:  # noqa: BLE001 - any decoder failure means "unreadable", never a crash
            return path  # the collate function counts it as skipped
        return Sample(index=i, view=self.transform(image), label=self.index.labels[i])
