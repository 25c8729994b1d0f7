"""The frozen teacher of ``ibot distill``: a weights file -> its backbone and heads, in its own architecture.

Any file ``model.init_from`` reads (``ibot.models.init_weights.read_source``: this package's run
folders, checkpoints and ``teacher.safetensors``, official iBOT / DINO checkpoints, timm / DINO /
DINOv2 ViTs). The architecture comes from the file: the saved config's ``model`` section for this
package's files, else the tensors (width from the [cls] token, depth from the blocks, patch size
from the patch embedding; the number of heads is that of the ``ARCHS`` entry of that width). Its
position embeddings are resampled once to the run's global crop and an RGB teacher's patch
embedding is adapted to ``data.channels`` as ``model.init_from`` does; the heads are kept when
they load, else the reason why not is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ibot.config import ModelConfig
from ibot.errors import ConfigError, DataError
from ibot.models.cnn_student import TimmCNN
from ibot.models.fit import load_fitted, shapes
from ibot.models.foreign import model_keys
from ibot.models.heads import ProjectionHead
from ibot.models.init_weights import fit_backbone, read_source
from ibot.models.vit import MaskedViT

Tensors = dict[str, torch.Tensor]
KEY = "distill.teacher"


@dataclass
class TeacherFile:
    """What ``read_teacher`` made of a file: the frozen backbone, its heads ({} and ``no_heads``
    saying why, when the file has none that load) and where they came from."""

    path: str  # the file read (a run folder's checkpoint or teacher.safetensors)
    layout: str
    model: ModelConfig  # the teacher's architecture
    backbone: MaskedViT
    heads: dict[str, ProjectionHead]  # {"head": ...} (one for [cls] and patches) or {"cls_head", "patch_head"}
    no_heads: str
    notes: tuple[str, ...]
    fingerprint: dict[str, Any]  # size and sha256 of the file: a resume refuses a changed teacher

    def describe(self) -> str:
        """``WIDTH x DEPTH, patch P[, K prototypes]``."""
        head = next(iter(self.heads.values()), None)
        protos = f", {head.last_layer.out_features} prototypes" if head is not None else ""
        return f"{describe_backbone(self.backbone)}{protos}"


def describe_backbone(backbone: MaskedViT | TimmCNN) -> str:
    if isinstance(backbone, TimmCNN):
        return backbone.describe()
    return f"{backbone.embed_dim} x {len(backbone.vit.blocks)}, patch {backbone.patch_size}"


def fingerprint(path: str | Path) -> dict[str, Any]:
    """Size and sha256 of a file (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def read_teacher(path: str | Path, img_size: int, in_chans: int) -> TeacherFile:
    """The teacher of ``path`` for global crops of ``img_size`` px and ``in_chans`` channels,
    frozen (no gradients) and in eval mode; one line for a file that is not a ViT this package
    runs, or whose patch size does not divide ``img_size``."""
    source, name = read_source(Path(path).expanduser(), KEY)
    tensors = source.teacher.backbone
    model = _architecture(source.model, tensors, name)
    if img_size % model.patch_size:
        raise ConfigError(
            f"{KEY}: {name} has patch size {model.patch_size}, which does not divide data.global_crop_size={img_size}"
        )
    backbone = MaskedViT.from_config(model, img_size, in_chans)
    notes = list(source.notes)
    fitted = fit_backbone(tensors, shapes(backbone.state_dict()), name, notes)
    load_fitted(backbone, fitted, name, "its backbone does not fit its own architecture", _mask_token)
    heads, no_heads = _heads(source.teacher.heads, source.teacher.no_heads, name)
    for module in (backbone, *heads.values()):
        module.eval().requires_grad_(False)
    return TeacherFile(name, source.layout, model, backbone, heads, no_heads, tuple(notes), fingerprint(name))


def _mask_token(key: str) -> bool:
    return key == "mask_token"  # the teacher never masks: files without one are fine


def _architecture(saved: dict[str, Any], tensors: Tensors, name: str) -> ModelConfig:
    """The teacher's ``ModelConfig``: its saved ``model`` section, else read off the tensors."""
    if "vit.cls_token" not in tensors:
        raise DataError(f"{KEY}: {name}: no 'cls_token' in its backbone: not a ViT this package can run")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if saved:
        kept = {k: v for k, v in saved.items() if k in known - {"init_from", "drop_path_rate"}}
        return ModelConfig(**kept, drop_path_rate=0.0)
    read = model_keys(tensors, f"{KEY}: {name}")  # as evaluation reads a foreign file (conv stems too)
    return ModelConfig(**read, mlp_dwconv=any(".mlp.dwconv." in k for k in tensors), drop_path_rate=0.0)


def _heads(found: dict[str, Tensors] | None, no_heads: str, name: str) -> tuple[dict[str, ProjectionHead], str]:
    """The file's projection heads built from their shapes, or {} and why there are none."""
    if not found or not any(found.values()):
        return {}, no_heads or "the file has no projection head"
    names = {"cls": "cls_head", "patch": "patch_head"} if "patch" in found else {"cls": "head"}
    heads = {}
    for kind, tensors in found.items():
        try:
            head = head_like(tensors)
            load_fitted(head, tensors, name, "its projection head does not fit a ProjectionHead")
        except (DataError, KeyError, IndexError) as exc:
            return {}, f"its projection head is not one this package builds ({str(exc) or type(exc).__name__})"
        heads[names[kind]] = head
    return heads, ""


_LINEAR = re.compile(r"^mlp\.(\d+)\.weight$")
_PROTOTYPES = "last_layer.parametrizations.weight.original1"


def head_like(tensors: Tensors, in_dim: int | None = None, norm_last_layer: bool = True) -> ProjectionHead:
    """A ``ProjectionHead`` of the shapes of ``tensors`` (its state dict); ``in_dim``: another input
    width (a student's head onto the same prototypes)."""
    layers = sorted((int(m.group(1)), tensors[k]) for k in tensors if (m := _LINEAR.match(k)))
    first, last = layers[0][1], layers[-1][1]
    hidden = int(first.shape[0]) if len(layers) > 1 else 1
    out_dim, bottleneck = tensors[_PROTOTYPES].shape
    width = int(first.shape[1]) if in_dim is None else in_dim
    if int(last.shape[0]) != bottleneck:
        raise DataError(f"bottleneck {last.shape[0]} != prototypes' {bottleneck}")
    return ProjectionHead(width, int(out_dim), hidden, int(bottleneck), len(layers), norm_last_layer)
