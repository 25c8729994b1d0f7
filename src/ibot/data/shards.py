"""WebDataset-style tar shards with random access: ``*.tar`` files of ``key.jpg`` (+ ``key.cls``).

The shards are indexed once (member offsets from the tar headers, cached like folder
indexes), then images are read with a seek, so the same sampler, resume and DDP logic as
for image folders applies. A sample is every member sharing a key; its image is the first
member with an image extension and its label the integer in ``key.cls`` (-1 if absent).
Members that do not decode are skipped with the same reasons as files in a folder, named
``SHARD.tar:MEMBER``.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from ibot.data.datasets import IMAGE_EXTENSIONS, Sample, decode_view
from ibot.data.decode import DEFAULT_MAX_PIXELS
from ibot.data.index_cache import cache_path, read_cache, write_cache
from ibot.data.pixels import require_readers
from ibot.data.reading import RGB8, Reading
from ibot.data.skips import UNREADABLE, Skip, SkipLog
from ibot.errors import DataError


@dataclass(frozen=True)
class ShardEntry:
    shard: int
    offset: int
    size: int
    label: int
    name: str = ""  # the member's name, for skip reports


def _index_shard(path: Path, shard_id: int) -> list[ShardEntry]:
    images: dict[str, tuple[int, int, str]] = {}
    labels: dict[str, int] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            ext = "." + ext.lower()
            if ext in IMAGE_EXTENSIONS and key not in images:
                images[key] = (member.offset_data, member.size, member.name)
            elif ext == ".cls":
                text = tar.extractfile(member).read().decode().strip()  # type: ignore[union-attr]
                labels[key] = int(text) if text.lstrip("-").isdigit() else -1
    return [ShardEntry(shard_id, off, size, labels.get(key, -1), name) for key, (off, size, name) in images.items()]


def find_shards(path: str | Path) -> list[Path]:
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: path does not exist")
    shards = [root] if root.is_file() else sorted(root.glob("*.tar"))
    if not shards:
        raise DataError(f"{root}: no .tar shards found")
    return shards


class TarShards(Dataset):
    """Random-access dataset over tar shards; unusable images yield a ``Skip`` (``SHARD:MEMBER``, reason)."""

    def __init__(
        self,
        path: str | Path,
        transform: Callable[[Image.Image], Any],
        index_cache: str | Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reading: Reading = RGB8,
    ) -> None:
        self.shards = find_shards(path)
        self.transform = transform
        self.max_pixels = max_pixels
        self.reading = reading
        self.skips = SkipLog()  # what this process failed to decode (a shard index has no scan skips)
        self.entries = self._load_index(index_cache)
        if not self.entries:
            raise DataError(f"{path}: shards contain no images")
        require_readers([e.name for e in self.entries])

    def _load_index(self, index_cache: str | Path | None) -> list[ShardEntry]:
        fingerprint = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.shards]
        cache_file = cache_path(index_cache, "shards-v2", json.dumps(fingerprint)) if index_cache else None
        cached = read_cache(cache_file, fingerprint) if cache_file is not None else None
        if cached is not None:
            return [ShardEntry(*e) for e in cached]
        entries = [e for i, p in enumerate(self.shards) for e in _index_shard(p, i)]
        if cache_file is not None:
            write_cache(cache_file, fingerprint, [[e.shard, e.offset, e.size, e.label, e.name] for e in entries])
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> tuple[int, ...]:
        return tuple(e.label for e in self.entries)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | Skip:
        i, seed = key if isinstance(key, tuple) else (key, None)
        entry = self.entries[i]
        where = f"{self.shards[entry.shard]}:{entry.name or entry.offset}"
        try:
            with open(self.shards[entry.shard], "rb") as f:
                f.seek(entry.offset)
                data = f.read(entry.size)
        except OSError:
            view = Skip(where, UNREADABLE)
        else:
            view = decode_view(self.transform, data, where, self.max_pixels, seed, self.reading)
        if isinstance(view, Skip):
            self.skips.add(view)  # in a loader worker this copy is lost: the collate passes it on
            return view
        return Sample(index=i, view=view, label=entry.label, seed=seed)
