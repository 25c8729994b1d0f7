"""Checkpoints: written atomically and durably, read without unpickling arbitrary objects.

A run folder keeps the newest ``train.keep_checkpoints`` step-numbered checkpoints
(``checkpoint-00000500.pt``, everything needed to resume: method incl. centers, optimiser,
scaler, step, RNG states, the resolved config; read with ``weights_only=True``) and
``checkpoint.pt``, a symbolic link to the newest. ``teacher.safetensors`` holds the teacher
backbone alone, with the model config in its metadata, for evaluation and for other code bases.

Every file is written to a temporary file in the same folder, flushed and fsync-ed, renamed over
its name, and the folder fsync-ed: a kill or a full disk at any moment leaves the previous file
whole. Temporary files of a killed run are removed when the next one starts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save

from ibot.errors import CheckpointWriteError, DataError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"  # the link to the newest step checkpoint
TEACHER_NAME = "teacher.safetensors"
_STEP_FILE = re.compile(r"checkpoint-(\d+)\.pt")
_TMP_SUFFIX = ".tmp"
_NEARLY_FULL = 16 * 2**20  # bytes free below which a failed write is taken for a full disk


def step_checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the folder's entry, not only the file's data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp)`` a temporary file in the same folder, fsync it, rename it to ``path``, fsync the folder.

    A crash or a write error at any point leaves ``path`` as it was (the temporary file is
    removed on errors; after a kill, ``remove_debris`` removes it at the next start).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_debris(folder: Path) -> int:
    """Delete the temporary files that killed writers left in ``folder``; returns the bytes freed."""
    freed = 0
    for tmp in folder.glob(f".*{_TMP_SUFFIX}"):
        try:
            freed += tmp.stat().st_size
            tmp.unlink()
        except FileNotFoundError:
            pass
    if freed:
        logger.info("removed %.1f MB of temporary files left by a killed run in %s", freed / 2**20, folder)
    return freed


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    # RNG states are CPU byte tensors even when the checkpoint was mapped onto a GPU.
    torch.set_rng_state(state["torch"].cpu())
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a parent module's state dict under ``prefix``, with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


class CheckpointStore:
    """The step checkpoints of one run folder: save the next, keep the newest K, load the newest that loads."""

    def __init__(self, folder: str | Path, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = keep

    def step_paths(self) -> list[tuple[int, Path]]:
        """(step, path) of the step checkpoints, newest first."""
        found = [
            (int(m.group(1)), p) for p in self.folder.glob("checkpoint-*.pt") if (m := _STEP_FILE.fullmatch(p.name))
        ]
        return sorted(found, reverse=True)

    def paths(self) -> list[Path]:
        """Checkpoints to resume from, newest first; a plain ``checkpoint.pt`` file (older runs) comes last."""
        paths = [p for _, p in self.step_paths()]
        legacy = self.folder / CHECKPOINT_NAME
        if legacy.is_file() and not legacy.is_symlink():
            paths.append(legacy)
        return paths

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write step ``step``'s checkpoint, point ``checkpoint.pt`` at it, drop all but the newest ``keep``.

        Raises ``CheckpointWriteError`` (one line: the path, the step, the cause) when the write
        fails, e.g. on a full disk; the previous checkpoints are untouched then.
        """
        path = self.folder / step_checkpoint_name(step)
        try:
            atomic_write(path, lambda tmp: _torch_save(state, tmp))
            self._point_at(path)
        except OSError as exc:
            raise _write_error(path, step, exc) from None
        older = [p for s, p in self.step_paths() if s < step]
        for old in older[self.keep - 1 :]:
            old.unlink(missing_ok=True)
        return path

    def _point_at(self, path: Path) -> None:
        link = self.folder / CHECKPOINT_NAME
        tmp = self.folder / f".{CHECKPOINT_NAME}.{os.getpid()}.link{_TMP_SUFFIX}"
        tmp.unlink(missing_ok=True)
        os.symlink(path.name, tmp)
        os.replace(tmp, link)  # atomic: the link always names a complete checkpoint
        _fsync_folder(self.folder)

    def load_newest(
        self, map_location: str | torch.device = "cpu", set_aside: bool = True
    ) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, and its path; None when there is none.

        An unreadable newer one (a damaged disk, a copy cut short) is renamed to ``*.unreadable``
        (kept for a look, no longer a candidate; by one process only: ``set_aside``) and passed
        over with a warning.
        """
        for path in self.paths():
            try:
                return load_checkpoint(path, map_location), path
            except DataError as exc:
                aside = path.with_name(path.name + ".unreadable")
                if set_aside:
                    os.replace(path, aside)
                logger.warning("%s; set aside as %s, falling back to the checkpoint before it", exc, aside.name)
        return None


def _torch_save(state: dict[str, Any], path: str) -> None:
    """``torch.save``, whose zip writer reports a failed write (a full disk, EIO) as a RuntimeError
    without an errno: turned into the OSError it is, ENOSPC when the disk has (almost) no room left."""
    try:
        torch.save(state, path)
    except RuntimeError as exc:
        if "inline_container" not in str(exc):  # not the writer: a real bug, keep its traceback
            raise
        full = shutil.disk_usage(Path(path).parent).free < _NEARLY_FULL
        raise OSError(errno.ENOSPC if full else errno.EIO, f"torch.save: {exc}") from None


def _write_error(path: Path, step: int, exc: OSError) -> CheckpointWriteError:
    """One line for an ``OSError`` (ENOSPC, EIO, EACCES, ...) while saving: the file, the step, the cause."""
    cause = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or type(exc).__name__)
    return CheckpointWriteError(
        f"{path}: could not write it at step {step} ({cause}); the previous checkpoint is intact"
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file
        raise DataError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None


def save_backbone(path: str | Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any], step: int = 0) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"format": "ibot-backbone", "config": json.dumps(config)}
    try:
        atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(save(tensors, metadata=metadata)))
    except OSError as exc:
        raise _write_error(Path(path), step, exc) from None


def load_backbone(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Backbone weights and the config they were trained with.

    ``path``: a run folder, its ``teacher.safetensors``, or a timm / DINO / iBOT ViT state dict
    (``.safetensors`` without ibot metadata, or ``.pth``/``.pt``/``.bin`` read with
    ``weights_only=True``), converted by ``ibot.models.foreign``.
    """
    from ibot.models.foreign import import_vit, unwrap

    path = Path(path)
    if path.is_dir():
        path = path / TEACHER_NAME
    if not path.is_file():
        raise DataError(f"{path}: backbone weights not found")
    if path.suffix != ".safetensors":
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise DataError(
                f"{path}: unreadable without unpickling arbitrary objects ({type(exc).__name__}); "
                "save the model's state_dict alone"
            ) from None
        return import_vit(unwrap(loaded, str(path)), str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: unreadable safetensors file ({type(exc).__name__})") from None
    if "config" not in metadata:
        return import_vit(tensors, str(path))
    return tensors, json.loads(metadata["config"])
