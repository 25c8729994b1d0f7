"""Reading weight files: the one place a path (a run folder, a checkpoint, a ``teacher.safetensors``,
a timm / DINO / iBOT / DINOv2 file) becomes what it holds.

A run folder holds two kinds of file: full checkpoints (``checkpoint-<step>.pt``, the newest linked
by ``checkpoint.pt``: student, teacher, heads, optimiser) and ``teacher.safetensors`` (the teacher's
backbone alone, with its config in the metadata). Which one a consumer reads from a folder is
stated once, in ``FOLDER_RULE``, with the reason. Files are read with ``weights_only=True``
(``ibot.storage.load_torch_weights``) or as safetensors; fitting what was read to a model is
``ibot.models.fit`` (and, for ``model.init_from``, ``ibot.models.init_weights``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ibot.errors import DataError
from ibot.models.foreign import import_vit, unwrap
from ibot.run_folder import RunFolder
from ibot.storage import load_torch_weights, read_safetensors

Tensors = dict[str, torch.Tensor]

BACKBONE, INIT, TOKENIZER = "backbone", "init", "tokenizer"

# purpose -> the files it reads from a run folder, first found wins ("checkpoint": checkpoint.pt,
# else the newest checkpoint-<step>.pt; "teacher": teacher.safetensors).
FOLDER_RULE: dict[str, tuple[str, ...]] = {
    # Evaluation, export, embed: the teacher backbone and the config it was trained with, from the
    # small file that needs no unpickling and exists once a run has saved at all.
    BACKBONE: ("teacher",),
    # model.init_from: a full checkpoint when there is one, for its heads (a run continued from it
    # keeps what its heads learned); else the backbone alone, and the heads start fresh.
    INIT: ("checkpoint", "teacher"),
    # mim.target=frozen: the teacher branch with its patch head (the head maps tokens to the
    # prototypes the targets are over), which only a full checkpoint holds.
    TOKENIZER: ("checkpoint",),
}

# What a missing file is called in each purpose's one-line error.
_MISSING = {BACKBONE: "backbone weights not found", INIT: "no such file or folder", TOKENIZER: "checkpoint not found"}

# Classes a purpose lets through ``weights_only`` loading: official full iBOT / DINO checkpoints
# hold their argparse ``args`` (a Namespace of plain values); init_from reads those files whole.
_ALLOWED: dict[str, tuple[type, ...]] = {INIT: (argparse.Namespace,)}


@dataclass(frozen=True)
class Held:
    """What a weights file holds: ``loaded`` is the object ``torch.save`` wrote, or the tensors of a
    ``.safetensors`` file; ``metadata`` is a ``.safetensors`` file's metadata ({} for torch files)."""

    path: Path
    loaded: Any
    metadata: dict[str, str]

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix == ".safetensors"


def resolve(path: str | Path, purpose: str) -> Path:
    """The file ``purpose`` reads at ``path``: ``path`` itself, or the one ``FOLDER_RULE`` picks in a
    run folder (the first rule's file when the folder has none of them: the error names it)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    run = RunFolder(path)
    for kind in FOLDER_RULE[purpose]:
        if kind == "teacher" and run.teacher.is_file():
            return run.teacher
        if kind == "checkpoint":
            if run.checkpoint_link.is_file():
                return run.checkpoint_link
            steps = run.step_checkpoints()
            if steps:
                return steps[0][1]
    return run.teacher if FOLDER_RULE[purpose][0] == "teacher" else run.checkpoint_link


def read(path: str | Path, purpose: str) -> Held:
    """What the file ``purpose`` reads at ``path`` holds; one line when it is missing or unreadable."""
    file = resolve(path, purpose)
    if not file.is_file():
        raise DataError(f"{file}: {_MISSING[purpose]}")
    if file.suffix == ".safetensors":
        tensors, metadata = read_safetensors(file)
        return Held(file, tensors, metadata)
    return Held(file, load_torch_weights(file, allowed=_ALLOWED.get(purpose, ())), {})


def read_backbone(path: str | Path) -> tuple[Tensors, dict[str, Any]]:
    """Backbone weights (``MaskedViT`` keys) and the config they were trained with, for evaluation.

    ``path``: a run folder, its ``teacher.safetensors``, or a timm / DINO / iBOT ViT state dict
    (``.safetensors`` without ibot metadata, or ``.pth``/``.pt``/``.bin``), converted by
    ``ibot.models.foreign``.
    """
    held = read(path, BACKBONE)
    if held.is_safetensors and "config" in held.metadata:
        return held.loaded, json.loads(held.metadata["config"])
    tensors = held.loaded if held.is_safetensors else unwrap(held.loaded, str(held.path))
    return import_vit(tensors, str(held.path))
