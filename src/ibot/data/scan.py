"""The one walk of an image folder: each real directory once, whatever its symbolic links do.

``os.walk(followlinks=True)`` enters ``class_a/loop -> ..`` again and again (a folder of 645
files listed 26,076 times). Here every directory is identified by (st_dev, st_ino) and
entered once. Real sub-folders are walked before symbolically linked ones, so a link into
the tree never takes files from their real place (and label); a link to a folder outside
the tree is followed, as users link data in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ibot.data.skips import DANGLING_LINK, IMAGE_NAMED_DIR, UNREADABLE_DIR, VISITED, Skip

# Listed by name; a file whose format the installed Pillow cannot decode (AVIF before Pillow
# 11.3, HEIC without a plugin) is still listed and skipped with that reason, never ignored.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".avif", ".heic", ".heif",
    ".npy", ".dcm", ".dicom",  # read by ibot.data.pixels
)  # fmt: skip
JPEG_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif")  # decoded by libjpeg-turbo's fast path when asked


@dataclass(frozen=True)
class FolderScan:
    """Image paths relative to the root (sorted) and what the walk left out (paths relative too).

    ``folders``: every folder the walk listed (or tried to), relative ("" is the root), with its
    modification time taken before listing it: what an index cache checks, at any depth.
    """

    paths: tuple[str, ...]
    skipped: tuple[Skip, ...]
    folders: tuple[tuple[str, int], ...] = ()


def scan_folder(root: str | Path) -> FolderScan:
    """Walk ``root``: real folders first, then linked ones not yet visited; files by image extension."""
    seen = _ancestor_keys(root)  # a link up to the root's parent would walk the root again, and more
    found: list[str] = []
    skipped: list[Skip] = []
    folders: list[tuple[str, int]] = []
    real: list[tuple[str, str]] = [(str(root), "")]  # (absolute, relative) folders still to list
    linked: list[tuple[str, str]] = []
    while real or linked:
        folder, rel = real.pop() if real else linked.pop(0)
        try:
            st = os.stat(folder)
        except OSError:  # a loop of links (ELOOP) or a link that vanished meanwhile
            skipped.append(Skip(rel, VISITED))
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen and rel:
            skipped.append(Skip(rel, VISITED))
            continue
        seen.add(key)
        folders.append((rel, st.st_mtime_ns))  # before listing: a change made meanwhile shows next time
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            skipped.append(Skip(rel or ".", UNREADABLE_DIR))
            continue
        for entry in entries:
            _visit(entry, os.path.join(rel, entry.name) if rel else entry.name, found, skipped, real, linked)
    return FolderScan(tuple(sorted(found)), tuple(sorted(skipped)), tuple(sorted(folders)))


def _visit(
    entry: os.DirEntry,
    rel: str,
    found: list[str],
    skipped: list[Skip],
    real: list[tuple[str, str]],
    linked: list[tuple[str, str]],
) -> None:
    """Sort one directory entry into files found, skips, or folders to walk (real or linked)."""
    is_link = entry.is_symlink()
    try:
        is_dir = entry.is_dir()
        is_file = not is_dir and entry.is_file()
    except OSError:  # a link to itself raises ELOOP here
        skipped.append(Skip(rel, VISITED))
        return
    is_image_name = entry.name.lower().endswith(IMAGE_EXTENSIONS)
    if is_link and not (is_dir or is_file or os.path.exists(entry.path)):
        skipped.append(Skip(rel, DANGLING_LINK))
    elif is_dir and is_image_name:
        skipped.append(Skip(rel, IMAGE_NAMED_DIR))  # a reader would fail on it, or be fooled by it
    elif is_dir:
        (linked if is_link else real).append((entry.path, rel))
    elif is_file and is_image_name:
        found.append(rel)


def _dir_key(folder: str) -> tuple[int, int]:
    """What identifies a directory, under any of the paths that lead to it."""
    st = os.stat(folder)
    return st.st_dev, st.st_ino


def _ancestor_keys(root: str | Path) -> set[tuple[int, int]]:
    """Keys of the root and of every folder above it (through its real path)."""
    keys = set()
    folder = os.path.realpath(root)
    while True:
        keys.add(_dir_key(folder))
        parent = os.path.dirname(folder)
        if parent == folder:
            return keys
        folder = parent
