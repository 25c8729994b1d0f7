"""Image folders: recursive file index, class sub-folders as labels, robust decoding.

An unusable image never crashes a run: ``__getitem__`` returns a ``Skip`` (path and reason)
for it and the collate function passes it on, so each command can report every skipped
file once. The dataset's ``skips`` holds what the scan left out and what this process
failed to decode.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ibot.data.decode import DEFAULT_MAX_PIXELS, decode_jpeg_scaled, load_rgb
from ibot.data.index_cache import cache_path, read_entry, write_cache
from ibot.data.pixels import require_readers
from ibot.data.reading import RGB8, Reading, decode_image
from ibot.data.scan import IMAGE_EXTENSIONS, JPEG_EXTENSIONS, FolderScan, scan_folder
from ibot.data.skips import Skip, SkipLog
from ibot.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "ImageFolderIndex",
    "Sample",
    "decode_view",
    "files_digest",
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


def decode_view(
    transform: Any, source: str | bytes, name: str, max_pixels: int, seed: int | None, reading: Reading = RGB8
) -> Any:
    """Decode ``source`` and apply ``transform``: its view of the image, or a ``Skip``.

    The transform receives an 8-bit RGB PIL image or an (H, W, C) float32 array in [0, 1]
    (``ibot.data.reading``). A transform with ``plan`` and ``cut``
    (``ibot.data.crop_plan.DeviceMultiCrop``) draws its crops from the seed and the stored size
    first, so the decoder can reduce an 8-bit image. (A check of what the transform can do, not
    of ``data.pipeline``, which ``ibot.data.pipeline`` decides once.)
    """
    if not hasattr(transform, "plan"):
        image = decode_image(source, name, reading, max_pixels)
        return image if isinstance(image, Skip) else transform_seeded(transform, image, seed)
    seed = random.getrandbits(63) if seed is None else seed
    plans = []  # drawn once, by whichever decoder reads the header first

    def draft(stored_size: tuple[int, int]) -> tuple[int, int]:
        if not plans:
            plans.append(transform.plan(stored_size, seed))
        return plans[0].draft_size()

    pixels = None
    if reading.rgb8 and _is_jpeg(source, name):
        source = _read(source) or source  # read once: PIL gets the same bytes if it has to decide
        pixels = decode_jpeg_scaled(source, name, max_pixels, draft) if isinstance(source, bytes) else None
    if pixels is None:  # not a JPEG libjpeg-turbo decodes cleanly: PIL decides, and names any reason
        image = decode_image(source, name, reading, max_pixels, draft)
        pixels = image if isinstance(image, (Skip, np.ndarray)) else np.asarray(image)
    if isinstance(pixels, Skip):
        return pixels
    if not plans:  # read whole (an array): the plan is drawn from its size now
        plans.append(transform.plan((pixels.shape[1], pixels.shape[0]), seed))
    return transform.cut(pixels, plans[0])


def _is_jpeg(source: str | bytes, name: str) -> bool:
    return source[:2] == b"\xff\xd8" if isinstance(source, bytes) else name.lower().endswith(JPEG_EXTENSIONS)


def _read(source: str | bytes) -> bytes:
    """The file's bytes; b"" when it cannot be read (``decode_rgb`` then names the reason from the path)."""
    if isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError:
        return b""


INDEX_CACHE_KIND = "index-v3"  # v3: every walked folder's mtime (v2: the root and its children; v1: no skips)


def _fingerprint(root: Path, folders: Iterable[str] = ("",)) -> list[list]:
    """[folder, modification time] of each of ``folders`` (relative to ``root``; -1 for one gone).

    A file added, removed or renamed changes its folder's time, at whatever depth.
    """
    stamps = []
    for rel in folders:
        try:
            stamps.append([rel, os.stat(os.path.join(root, rel)).st_mtime_ns])
        except OSError:
            stamps.append([rel, -1])
    return stamps


def _cached_scan(root: Path, cache_dir: str | Path | None) -> FolderScan:
    """``scan_folder(root)``, read from / written to the index cache when there is one.

    The cache holds the folders the walk listed with their times; it is used only while every
    one of them still has that time.
    """
    if not cache_dir:
        return scan_folder(root)
    # The extensions listed are part of the key: a release that reads more formats lists again.
    cache_file = cache_path(cache_dir, INDEX_CACHE_KIND, f"{root.resolve()}|{','.join(IMAGE_EXTENSIONS)}")
    entry = read_entry(cache_file)
    cached = _fresh_scan(root, *entry) if entry is not None else None
    if cached is not None:
        return cached
    scan = scan_folder(root)
    if scan.paths:
        payload = {"paths": list(scan.paths), "skipped": [list(s) for s in scan.skipped]}
        write_cache(cache_file, [list(f) for f in scan.folders], payload)
    return scan


def _fresh_scan(root: Path, fingerprint: Any, payload: Any) -> FolderScan | None:
    """The cached scan while its folders are unchanged; None when stale or not a v3 entry."""
    try:
        folders = tuple((str(rel), int(mtime)) for rel, mtime in fingerprint)
        if not folders or _fingerprint(root, [rel for rel, _ in folders]) != [list(f) for f in folders]:
            return None
        paths = tuple(str(p) for p in payload["paths"])
        skipped = tuple(Skip(str(path), str(reason)) for path, reason in payload["skipped"])
    except (TypeError, ValueError, KeyError):  # a hand-edited or foreign file: scan again
        return None
    return FolderScan(paths, skipped, folders)


def files_digest(paths: Iterable[str]) -> str:
    """A hash of each file's path, size and modification time (one ``stat`` per file).

    What tells a file rewritten under the same name from the one a cache was made of.
    """
    digest = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{path}\0{stamp}\0".encode(errors="surrogateescape"))
    return digest.hexdigest()


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
        every folder the scan walked, so a start over millions of files does not re-list them
        and a change at any depth is seen.
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
        reading: Reading = RGB8,
    ) -> None:
        self.index = ImageFolderIndex.scan(root, index_cache)
        require_readers(self.index.paths)
        self.transform = transform
        self.max_pixels = max_pixels
        self.reading = reading
        self.skips = SkipLog(self.index.skipped)

    def __len__(self) -> int:
        return len(self.index.paths)

    @property
    def labels(self) -> tuple[int, ...]:
        return self.index.labels

    @property
    def classes(self) -> tuple[str, ...]:
        return self.index.classes

    @property
    def files(self) -> tuple[str, ...]:
        """The files the images are read from (what a cache of their features depends on)."""
        return self.index.paths

    def item_path(self, i: int) -> str:
        """The file of image ``i``, as skip lists name it."""
        return self.index.paths[i]

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | Skip:
        """``key`` is an index, or (index, seed) from ``InfiniteSampler`` for seeded augmentation."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        path = self.index.paths[i]
        view = decode_view(self.transform, path, path, self.max_pixels, seed, self.reading)
        if isinstance(view, Skip):
            self.skips.add(view)  # in a loader worker this copy is lost: the collate passes it on
            return view
        return Sample(index=i, view=view, label=self.index.labels[i], seed=seed)
