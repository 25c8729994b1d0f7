"""Checkpoints: written atomically, read without unpickling arbitrary objects.

``checkpoint.pt`` holds everything needed to resume (method incl. centers, optimiser,
scaler, step, RNG states, the resolved config) and is read with ``weights_only=True``.
``teacher.safetensors`` holds the teacher backbone alone, with the model config in its
metadata, for evaluation and for other code bases.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from ibot.errors import DataError

CHECKPOINT_NAME = "checkpoint.pt"
TEACHER_NAME = "teacher.safetensors"


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder and rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file
        raise DataError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None


def save_backbone(path: str | Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"format": "ibot-backbone", "config": json.dumps(config)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


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
