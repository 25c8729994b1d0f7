"""Image folders: recursive file index, class sub-folders as labels, robust decoding.

An unusable image never crashes a run: ``__getitem__`` returns a ``Skip`` (path and reason)
for it and the collate function passes it on, so each command can report every skipped
file once. The dataset's ``skips`` holds what the scan left out and what this process
failed to decode.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ibot.data.decode import DEFAULT_MAX_PIXELS, decode_jpeg_scaled, decode_rgb, load_rgb
from ibot.data.index_cache import cache_path, read_cache, write_cache
from ibot.data.scan import IMAGE_EXTENSIONS, FolderScan, scan_folder
from ibot.data.skips import Skip, SkipLog
from ibot.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "ImageFolderIndex",
    "Sample",
    "decode_view",
    "load_rgb",
    "transform_seeded",
]


def transform_seeded(transform: Callable[[Image.Image], Any], image: Image.Image, seed: int | None) -> Any:
    """Apply ``transform``; with a seed, its random draws depend on that seed alone."""
    if seed is None:
        return transform(image)
    # torchvision draws from the global torch RNG: fork it so the seed is this image's alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def decode_view(transform: Any, source: str | bytes, name: str, max_pixels: int, seed: int | None) -> Any:
    """Decode ``source`` and apply ``transform``: its view of the image, or a ``Skip``.

    A transform with ``plan`` and ``cut`` (``ibot.data.crop_plan.DeviceMultiCrop``) draws its
    crops from the seed and the stored size first, so the decoder can reduce the image.
    """
    if not hasattr(transform, "plan"):
        image = decode_rgb(source, name, max_pixels)
        return image if isinstance(image, Skip) else transform_seeded(transform, image, seed)
    seed = random.getrandbits(63) if seed is None else seed
    plans = []  # drawn once, by whichever decoder reads the header first

    def draft(stored_size: tuple[int, int]) -> tuple[int, int]:
        if not plans:
            plans.append(transform.plan(stored_size, seed))
        return plans[0].draft_size()

    pixels = None
    if _is_jpeg(source, name):
        source = _read(source) or source  # read once: PIL gets the same bytes if it has to decide
        pixels = decode_jpeg_scaled(source, name, max_pixels, draft) if isinstance(source, bytes) else None
    if pixels is None:  # not a JPEG libjpeg-turbo decodes cleanly: PIL decides, and names any reason
        image = decode_rgb(source, name, max_pixels, draft)
        pixels = image if isinstance(image, Skip) else np.asarray(image)
    return pixels if isinstance(pixels, Skip) else transform.cut(pixels, plans[0])


def _is_jpeg(source: str | bytes, name: str) -> bool:
    return source[:2] == b"\xff\xd8" if isinstance(source, bytes) else name.lower().endswith((".jpg", ".jpeg"))


def _read(source: str | bytes) -> bytes:
    """The file's bytes; b"" when it cannot be read (``decode_rgb`` then names the reason from the path)."""
    if isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _fingerprint(root: Path) -> list[list]:
    """Modification times of ``root`` and its direct sub-folders: what adding a class or file changes."""
    entries = [["", root.stat().st_mtime_ns]]
    with os.scandir(root) as it:
        for entry in it:
            try:
                if entry.is_dir():
                    entries.append([entry.name, entry.stat().st_mtime_ns])
            except OSError:  # a link to itself: the scan reports it
                entries.append([entry.name, -1])
    return sorted(entries)


def _cached_scan(root: Path, cache_dir: str | Path | None) -> FolderScan:
    """``scan_folder(root)``, read from / written to the index cache when there is one."""
    if not cache_dir:
        return scan_folder(root)
    # v2: the payload holds the scan's skips too (v1 held the paths alone).
    cache_file = cache_path(cache_dir, "index-v2", str(root.resolve()))
    fingerprint = _fingerprint(root)
    cached = read_cache(cache_file, fingerprint)
    if isinstance(cached, dict) and {"paths", "skipped"} <= cached.keys():
        return FolderScan(tuple(cached["paths"]), tuple(Skip(*s) for s in cached["skipped"]))
    scan = scan_folder(root)
    if scan.paths:
        write_cache(cache_file, fingerprint, {"paths": list(scan.paths), "skipped": [list(s) for s in scan.skipped]})
    return scan


@dataclass(frozen=True)
class ImageFolderIndex:
    """Sorted image paths under a root with a label per path (-1 when there are no class folders).

    ``skipped``: what the scan left out (links, loops, folders named like images), full paths.
    """

    root: Path
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    skipped: tuple[Skip, ...] = ()

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
        scan = _cached_scan(root, cache_dir)
        relative = scan.paths
        if not relative:
            raise DataError(f"{root}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        parts = [r.split(os.sep) for r in relative]
        top = sorted({p[0] for p in parts if len(p) > 1})
        class_to_idx = {name: i for i, name in enumerate(top)}
        labels = tuple(class_to_idx[p[0]] if len(p) > 1 else -1 for p in parts)
        skipped = tuple(Skip(str(root / s.path), s.reason) for s in scan.skipped)
        return ImageFolderIndex(root, tuple(str(root / r) for r in relative), labels, tuple(top), skipped)


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
    """Images under ``root`` (recursive); unusable files yield a ``Skip`` instead of raising."""

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any],
        index_cache: str | Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.index = ImageFolderIndex.scan(root, index_cache)
        self.transform = transform
        self.max_pixels = max_pixels
        self.skips = SkipLog(self.index.skipped)

    def __len__(self) -> int:
        return len(self.index.paths)

    @property
    def labels(self) -> tuple[int, ...]:
        return self.index.labels

    @property
    def classes(self) -> tuple[str, ...]:
        return self.index.classes

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | Skip:
        """``key`` is an index, or (index, seed) from ``InfiniteSampler`` for seeded augmentation."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        path = self.index.paths[i]
        view = decode_view(self.transform, path, path, self.max_pixels, seed)
        if isinstance(view, Skip):
            self.skips.add(view)  # in a loader worker this copy is lost: the collate passes it on
            return view
        return Sample(index=i, view=view, label=self.index.labels[i], seed=seed)
