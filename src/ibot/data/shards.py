"""WebDataset-style tar shards with random access: ``*.tar`` files of ``key.jpg`` (+ ``key.cls``).

The shards are indexed once (member offsets from the tar headers, cached like folder
indexes), then images are read with a seek, so the same sampler, resume and DDP logic as
for image folders applies. A sample is every member sharing a key; its image is the first
member with an image extension and its label the integer in ``key.cls`` (-1 if absent).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from ibot.data.datasets import IMAGE_EXTENSIONS, Sample, load_rgb, transform_seeded
from ibot.data.index_cache import cache_path, read_cache, write_cache
from ibot.errors import DataError


@dataclass(frozen=True)
class ShardEntry:
    shard: int
    offset: int
    size: int
    label: int


def _index_shard(path: Path, shard_id: int) -> list[ShardEntry]:
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            ext = "." + ext.lower()
            if ext in IMAGE_EXTENSIONS and key not in images:
                images[key] = (member.offset_data, member.size)
            elif ext == ".cls":
                text = tar.extractfile(member).read().decode().strip()  # type: ignore[union-attr]
                labels[key] = int(text) if text.lstrip("-").isdigit() else -1
    return [ShardEntry(shard_id, off, size, labels.get(key, -1)) for key, (off, size) in images.items()]


def find_shards(path: str | Path) -> list[Path]:
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: path does not exist")
    shards = [root] if root.is_file() else sorted(root.glob("*.tar"))
    if not shards:
        raise DataError(f"{root}: no .tar shards found")
    return shards


class TarShards(Dataset):
    """Random-access dataset over tar shards; unreadable images yield their key for skipping."""

    def __init__(
        self, path: str | Path, transform: Callable[[Image.Image], Any], index_cache: str | Path | None = None
    ) -> None:
        self.shards = find_shards(path)
        self.transform = transform
        self.entries = self._load_index(index_cache)
        if not self.entries:
            raise DataError(f"{path}: shards contain no images")

    def _load_index(self, index_cache: str | Path | None) -> list[ShardEntry]:
        fingerprint = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.shards]
        cache_file = cache_path(index_cache, "shards", json.dumps(fingerprint)) if index_cache else None
        cached = read_cache(cache_file, fingerprint) if cache_file is not None else None
        if cached is not None:
            return [ShardEntry(*e) for e in cached]
        entries = [e for i, p in enumerate(self.shards) for e in _index_shard(p, i)]
        if cache_file is not None:
            write_cache(cache_file, fingerprint, [[e.shard, e.offset, e.size, e.label] for e in entries])
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> tuple[int, ...]:
        return tuple(e.label for e in self.entries)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | str:
        i, seed = key if isinstance(key, tuple) else (key, None)
        entry = self.entries[i]
        where = f"{self.shards[entry.shard]}@{entry.offset}"
        try:
            with open(self.shards[entry.shard], "rb") as f:
                f.seek(entry.offset)
                image = load_rgb(io.BytesIO(f.read(entry.size)))
        except Exception:  # noqa: BLE001 - unreadable member: skipped and counted by the collate
            return where
        return Sample(index=i, view=transform_seeded(self.transform, image, seed), label=entry.label, seed=seed)
