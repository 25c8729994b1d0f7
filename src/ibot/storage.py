"""Files that must never be half-written, and the backbone file every other part reads.

``atomic_write`` writes to a temporary file in the same folder, flushes and fsyncs it, renames
it over its name and fsyncs the folder: a kill or a full disk at any moment leaves the previous
file whole; ``remove_debris`` deletes what killed writers left. ``teacher.safetensors`` holds a
backbone alone, with its model config in the metadata (``save_backbone``; read by
``ibot.models.reader``). ``load_torch_weights`` is the one ``torch.load`` (``weights_only=True``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save

from ibot.errors import CheckpointWriteError, DataError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"  # a run folder's link to its newest step checkpoint
TEACHER_NAME = "teacher.safetensors"
TMP_SUFFIX = ".tmp"
_STEP_FILE = re.compile(r"checkpoint-(\d+)\.pt")


def step_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of a run folder's step checkpoints (``checkpoint-00000500.pt``), newest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*.pt") if (m := _STEP_FILE.fullmatch(p.name))]
    return sorted(found, reverse=True)


def fsync_path(path: str | Path) -> None:
    """fsync a file (its data on disk before a rename names it) or a folder (a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the folder's entry, not only the file's data)."""
    fsync_path(folder)


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp)`` a temporary file in the same folder, fsync it, rename it to ``path``, fsync the folder.

    A crash or a write error at any point leaves ``path`` as it was (the temporary file is
    removed on errors; after a kill, ``remove_debris`` removes it at the next start).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_debris(folder: Path) -> int:
    """Delete the temporary files that killed writers left in ``folder``; returns the bytes freed."""
    freed = 0
    for tmp in folder.glob(f".*{TMP_SUFFIX}"):
        try:
            freed += tmp.stat().st_size
            tmp.unlink()
        except FileNotFoundError:
            pass
    if freed:
        logger.info("removed %.1f MB of temporary files left by a killed run in %s", freed / 2**20, folder)
    return freed


def write_error(path: Path, step: int, exc: OSError) -> CheckpointWriteError:
    """One line for an ``OSError`` (ENOSPC, EIO, EACCES, ...) while saving: the file, the step, the cause."""
    cause = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or type(exc).__name__)
    return CheckpointWriteError(
        f"{path}: could not write it at step {step} ({cause}); the previous checkpoint is intact"
    )


def save_backbone(path: str | Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any], step: int = 0) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"format": "ibot-backbone", "config": json.dumps(config)}
    try:
        atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(save(tensors, metadata=metadata)))
    except OSError as exc:
        raise write_error(Path(path), step, exc) from None


# How a ``torch.save`` file begins: a zip archive (PyTorch >= 1.6), or the legacy format, a
# protocol-2 pickle of torch's magic number 0x1950a86a20f9469cfc6c (a 10-byte LONG1).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_torch_weights(path: Path, allowed: Sequence[type] = (), map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (the classes ``allowed`` let through too); one line
    telling a file that is not a PyTorch checkpoint, a damaged one, and one that only loads by
    unpickling arbitrary objects apart."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the weights ({exc.strerror or type(exc).__name__})") from None
    if not (head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC):
        what = "an empty file" if not head else "neither a torch.save zip archive nor its legacy pickle"
        raise DataError(f"{path}: not a PyTorch checkpoint ({what})")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file
        unsafe = _UNSAFE_GLOBAL.search(str(exc))
        if unsafe is not None and _may_exist(unsafe.group(1)):
            raise DataError(
                f"{path}: unreadable without unpickling {unsafe.group(1)}, which can run arbitrary code; "
                "save the model's state_dict alone"
            ) from None
        if head.startswith(_ZIP_MAGIC) and not _holds_pickle(path):
            raise DataError(f"{path}: not a PyTorch checkpoint (a zip archive without data.pkl)") from None
        raise DataError(f"{path}: damaged or truncated PyTorch checkpoint ({type(exc).__name__})") from None


def _holds_pickle(path: Path) -> bool:
    """Whether the zip archive at ``path`` has torch.save's ``<name>/data.pkl`` (True if unreadable)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[-1] == "data.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return True  # a damaged archive: the caller says so


def _may_exist(name: str) -> bool:
    """False when ``name`` (``module.attr...``) is missing from a module already imported: a name
    cut short by a truncated legacy file (``torch._utils._rebuild_tens``), not a real class."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:i]))
        if obj is not None:
            for attr in parts[i:]:
                obj = getattr(obj, attr, None)
                if obj is None:
                    return False
            return True
    return True  # a module not imported here: nothing says the name is not real


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A .safetensors file's tensors and metadata; one line when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: unreadable safetensors file ({type(exc).__name__})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint (``checkpoint*.pt``), read with ``load_torch_weights``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    return load_torch_weights(path, map_location=map_location)


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a parent module's state dict under ``prefix``, with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
