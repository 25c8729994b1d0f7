"""Checkpoints: written atomically and durably, read without unpickling arbitrary objects.

A run folder keeps the newest ``train.keep_checkpoints`` step-numbered checkpoints
(``checkpoint-00000500.pt``, everything needed to resume: method incl. centers, optimiser,
scaler, step, RNG states, the resolved config; read with ``weights_only=True``) and
``checkpoint.pt``, a symbolic link to the newest. Each is written by ``ibot.storage.atomic_write``:
a kill or a full disk at any moment leaves the previous file whole.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from ibot.errors import DataError
from ibot.storage import (
    CHECKPOINT_NAME,
    TMP_SUFFIX,
    atomic_write,
    fsync_folder,
    load_checkpoint,
    step_checkpoints,
    write_error,
)

logger = logging.getLogger(__name__)

_NEARLY_FULL = 16 * 2**20  # bytes free below which a failed write is taken for a full disk


def step_checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


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


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


class CheckpointStore:
    """The step checkpoints of one run folder: save the next, keep the newest K, load the newest that loads."""

    def __init__(self, folder: str | Path, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = keep

    def step_paths(self) -> list[tuple[int, Path]]:
        """(step, path) of the step checkpoints, newest first."""
        return step_checkpoints(self.folder)

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
            raise write_error(path, step, exc) from None
        older = [p for s, p in self.step_paths() if s < step]
        for old in older[self.keep - 1 :]:
            old.unlink(missing_ok=True)
        return path

    def _point_at(self, path: Path) -> None:
        link = self.folder / CHECKPOINT_NAME
        tmp = self.folder / f".{CHECKPOINT_NAME}.{os.getpid()}.link{TMP_SUFFIX}"
        tmp.unlink(missing_ok=True)
        os.symlink(path.name, tmp)
        os.replace(tmp, link)  # atomic: the link always names a complete checkpoint
        fsync_folder(self.folder)

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
