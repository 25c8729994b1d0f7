"""Starting weights of a pre-training run (``model.init_from``): a file or run folder -> state dicts
for the student and teacher branches of the config's model.

Layouts, told apart by their keys:

- this package's run folder (the file ``ibot.models.reader.FOLDER_RULE`` names for init_from: a
  full checkpoint when there is one, for its heads), one of its checkpoints (student and teacher, backbones and heads),
  or a ``teacher.safetensors`` (the teacher's backbone alone, for both branches);
- official iBOT / DINO full checkpoints: ``student`` and ``teacher`` entries, keys under
  ``module.`` / ``backbone.`` / ``head.``; the heads' weight-norm ``weight_g`` / ``weight_v`` become
  ``ProjectionHead``'s ``parametrizations.weight.original0`` / ``original1``; iBOT's separate patch
  prototypes (``last_layer2``, behind the MLP both branches share) become the patch head;
- a backbone alone: a timm, DINO, iBOT or DINOv2 state dict (``ibot.models.foreign.vit_state``).

Every check against the config is made here, before a run writes anything: width, depth, patch
size, stem or any other backbone shape that differs is a one-line ``ConfigError``; position
embeddings are resampled to the config's crop; an RGB backbone's first convolution (the patch
embedding, or the conv stem's first layer) is adapted to ``data.channels`` as timm's
``adapt_input_conv`` does (1 channel: the sum of the RGB filters, so a grey image gets the tokens
its RGB copy got; N: the RGB filters repeated to N and scaled by 3/N, which keeps the response to
a flat image as it was); heads whose shapes differ from the config's are left out (the run starts
them fresh) with the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from torch import nn

from ibot.config import ARCHS, ModelConfig
from ibot.errors import ConfigError, DataError
from ibot.models.fit import load_fitted, misfit, shapes
from ibot.models.foreign import block_count, stem_keys, unwrap, vit_state
from ibot.models.heads import ProjectionHead
from ibot.models.reader import INIT, read, resolve
from ibot.models.vit import MaskedViT
from ibot.storage import CHECKPOINT_NAME, TEACHER_NAME, sub_state_dict

Tensors = dict[str, torch.Tensor]

_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


@dataclass
class _Branch:
    """One branch as read: ``MaskedViT`` backbone keys and the heads found ({"cls": ..., "patch": ...}
    in ``ProjectionHead`` keys; "patch" absent when one head served both), or why there are none."""

    backbone: Tensors
    heads: dict[str, Tensors] | None
    no_heads: str = ""


@dataclass
class _Source:
    layout: str
    student: _Branch
    teacher: _Branch
    patch_size: int | None = None  # from a saved config; else read off the patch embedding
    notes: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)  # the saved config's model section (this package's files)


@dataclass(frozen=True)
class InitWeights:
    """Where the weights came from and what each branch loads (``backbone.*`` and, when they fit,
    ``head.*`` or ``cls_head.*`` / ``patch_head.*``); ``fresh_heads``: why the heads start fresh
    ("" when they were loaded)."""

    source: str
    layout: str
    student: Tensors
    teacher: Tensors
    notes: tuple[str, ...] = ()
    fresh_heads: str = ""

    def summary(self) -> str:
        """One line: what was loaded from where."""
        loaded = "backbones" if self.fresh_heads else "backbones and heads"
        notes = "".join(f"; {n}" for n in self.notes)
        return f"model.init_from: student and teacher {loaded} from {self.source} ({self.layout}){notes}"

    def load_into(self, student: nn.ModuleDict, teacher: nn.ModuleDict) -> None:
        """Both ``IBOT`` branches hold what was read; what a file lacks (a [mask] token, fresh heads)
        stays as built, anything else missing or unexpected is one line."""
        for branch, state in ((student, self.student), (teacher, self.teacher)):
            load_fitted(branch, state, self.source, "model.init_from does not fit the run's model", _may_lack)


def read_init_weights(path: str | Path, cfg: ModelConfig, img_size: int, in_chans: int = 3) -> InitWeights:
    """Read ``path`` and fit it to the model of ``cfg`` at ``img_size`` px of ``in_chans`` channels
    (``data.channels``; every check made here)."""
    source, name = read_source(Path(path).expanduser())
    backbone_shapes, head_shapes = _expected_shapes(cfg, img_size, in_chans)
    _check_architecture(source, cfg, name)
    notes = list(source.notes)
    backbones = [fit_backbone(b.backbone, backbone_shapes, name, notes) for b in (source.student, source.teacher)]
    heads, fresh = _fit_heads(source, head_shapes, cfg.shared_head, notes)
    student, teacher = ({**_prefixed(b, "backbone."), **h} for b, h in zip(backbones, heads))
    return InitWeights(name, source.layout, student, teacher, tuple(notes), fresh)


def _may_lack(key: str) -> bool:
    """What a branch may keep as built: a [mask] token (DINO and backbone files have none), fresh heads."""
    return key == "backbone.mask_token" or not key.startswith("backbone.")


# Reading: file or folder (ibot.models.reader) -> _Source


def read_source(path: Path, key: str = "model.init_from") -> tuple[_Source, str]:
    """What ``path`` (a file, or a run folder as ``ibot.models.reader.FOLDER_RULE`` says) holds, and
    the file read; ``key``: the option that named ``path`` (for the errors); also ``ibot distill``'s
    teacher (``ibot.models.teacher_file``)."""
    if not path.exists():
        raise ConfigError(f"{key}: {path}: no such file or folder")
    file = resolve(path, INIT)
    if not file.is_file():
        raise ConfigError(f"{key}: {path}: no {CHECKPOINT_NAME}, checkpoint-*.pt or {TEACHER_NAME} in it")
    held = read(file, INIT)
    name = str(held.path)
    loaded = held.loaded
    if held.is_safetensors:
        return _from_safetensors(loaded, held.metadata, name), name
    if isinstance(loaded, dict) and isinstance(loaded.get("method"), dict):
        return _from_ibot_checkpoint(loaded, name), name
    if isinstance(loaded, dict) and isinstance(loaded.get("teacher"), dict):
        return _from_official(loaded, name), name
    return _from_backbone(unwrap(loaded, name), name), name


def _from_safetensors(tensors: Tensors, metadata: dict[str, str], source: str) -> _Source:
    if "config" not in metadata:
        return _from_backbone(tensors, source)
    model = json.loads(metadata["config"]).get("model", {})
    branch = _Branch(tensors, None, f"{TEACHER_NAME} holds the backbone alone")
    return _Source(f"ibot {TEACHER_NAME}", branch, branch, model.get("patch_size"), model=model)


def _from_ibot_checkpoint(state: dict[str, Any], source: str) -> _Source:
    method = state["method"]
    student, teacher = (_our_branch(sub_state_dict(method, f"{b}.")) for b in ("student", "teacher"))
    if not teacher.backbone:  # an ``ibot distill`` run's (its teacher is not saved): its model is the student
        if "student.proj.weight" in method:  # distill.objective=ema_head: its head takes the projected tokens
            student = _Branch(student.backbone, None, "an ema_head distillation's head reads the teacher's width")
        teacher = student
    model = state.get("config", {}).get("model", {})
    return _Source("ibot checkpoint", student, teacher, model.get("patch_size"), model=model)


def _our_branch(state: Tensors) -> _Branch:
    heads = {"cls": sub_state_dict(state, "head.")}
    if not heads["cls"]:
        heads = {"cls": sub_state_dict(state, "cls_head."), "patch": sub_state_dict(state, "patch_head.")}
    return _Branch(sub_state_dict(state, "backbone."), heads)


def _from_official(loaded: dict[str, Any], source: str) -> _Source:
    """An official iBOT / DINO checkpoint: ``student`` (DDP: ``module.``) and ``teacher`` entries."""
    teacher = _official_branch(loaded["teacher"], source)
    # A checkpoint cut down to its teacher: both branches start from it.
    student = _official_branch(loaded["student"], source) if loaded.get("student") else teacher
    ibot = "mask_token" in teacher.backbone or any(".last_layer2." in k for k in loaded["teacher"])
    return _Source(f"official {'iBOT' if ibot else 'DINO'} checkpoint", student, teacher)


def _official_branch(tensors: Tensors, source: str) -> _Branch:
    plain = {k.removeprefix("module."): v for k, v in tensors.items()}
    # A teacher entry may hold the ViT's keys bare (no MultiCropWrapper around it).
    backbone, _ = vit_state(sub_state_dict(plain, "backbone.") or plain, source)
    head = {_weight_norm_key(k): v for k, v in sub_state_dict(plain, "head.").items()}
    if not head:
        return _Branch(backbone, None, "the file has no projection head")
    if any(k.startswith("mlp2.") for k in head):
        return _Branch(backbone, None, "the file's patch head has no bottleneck (mlp2)")
    cls = {k: v for k, v in head.items() if not k.startswith("last_layer2.")}
    heads = {"cls": cls}
    patch = sub_state_dict(head, "last_layer2.")
    cls_last = sub_state_dict(cls, "last_layer.")
    # iBOT's shared_head registers one last layer under both names: same tensors, one head.
    if patch and not all(k in cls_last and torch.equal(v, cls_last[k]) for k, v in patch.items()):
        mlp = {k: v for k, v in cls.items() if k.startswith("mlp.")}
        heads["patch"] = {**mlp, **_prefixed(patch, "last_layer.")}
    return _Branch(backbone, heads)


def _weight_norm_key(key: str) -> str:
    layer, _, name = key.rpartition(".")
    return f"{layer}.{_WEIGHT_NORM[name]}" if name in _WEIGHT_NORM else key


def _from_backbone(tensors: Tensors, source: str) -> _Source:
    backbone, notes = vit_state(tensors, source)
    layout = "DINOv2 ViT state dict" if notes or "mask_token" in backbone else "ViT state dict"
    branch = _Branch(backbone, None, "the file holds a backbone alone")
    return _Source(layout, branch, branch, notes=notes)


# Fitting: _Source -> the config's shapes


def _expected_shapes(
    cfg: ModelConfig, img_size: int, in_chans: int
) -> tuple[dict[str, torch.Size], dict[str, torch.Size]]:
    """Parameter shapes of the config's backbone and head, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        backbone = MaskedViT.from_config(cfg, img_size, in_chans)
        head = ProjectionHead.from_config(cfg, backbone.embed_dim)
    return shapes(backbone.state_dict()), shapes(head.state_dict())


def _check_architecture(source: _Source, cfg: ModelConfig, name: str) -> None:
    """Width and depth, patch size and stem of the file against the config, one line each."""
    backbone = source.teacher.backbone
    if "vit.cls_token" not in backbone:
        raise DataError(f"{name}: no 'cls_token' in its backbone: not a ViT this package can start from")
    width, depth = backbone["vit.cls_token"].shape[-1], block_count(backbone)
    arch = ARCHS[cfg.arch]
    want_width, want_depth = arch["embed_dim"], cfg.depth or arch["depth"]
    if (width, depth) != (want_width, want_depth):
        depth_key = f", model.depth={cfg.depth}" if cfg.depth else ""
        raise ConfigError(
            f"{name}: width {width}, depth {depth}; the config has model.arch={cfg.arch}{depth_key} "
            f"({want_width} x {want_depth})"
        )
    conv_stem = any(k.startswith("vit.patch_embed.backbone.") for k in backbone)
    if conv_stem != (cfg.stem == "conv"):
        stem = "conv" if conv_stem else "patch"
        raise ConfigError(f"{name}: a {stem} stem; the config has model.stem={cfg.stem}")
    patch_size = source.patch_size or stem_keys(backbone)["patch_size"]
    if patch_size != cfg.patch_size:
        raise ConfigError(
            f"{name}: patch size {patch_size}; the config has model.patch_size={cfg.patch_size} "
            "(a patch embedding is not resampled)"
        )


def fit_backbone(state: Tensors, expected: dict[str, torch.Size], name: str, notes: list[str]) -> Tensors:
    """Position embeddings resampled to the config's grid, an RGB input convolution adapted to the
    config's channels; any other difference is an error."""
    state = dict(state)
    _adapt_channels(state, expected, name, notes)
    want = expected["vit.pos_embed"]
    if state["vit.pos_embed"].shape != want:
        old, new = _grid(state["vit.pos_embed"].shape[1], name), _grid(want[1], name)
        state["vit.pos_embed"] = resample_abs_pos_embed(state["vit.pos_embed"], [new, new], [old, old], 1)
        note = f"pos-embed resampled {old}x{old} -> {new}x{new}"
        if note not in notes:
            notes.append(note)
    if problem := misfit(expected, state, may_lack=lambda key: key == "mask_token"):
        raise ConfigError(f"{name}: its backbone does not fit model.* of the config; {problem}")
    return state


# The first convolution over the pixels: the conv stem's first layer, else the linear patchify.
_STEM_CONV, _PATCH_CONV = "vit.patch_embed.backbone.0.weight", "vit.patch_embed.proj.weight"


def _adapt_channels(state: Tensors, expected: dict[str, torch.Size], name: str, notes: list[str]) -> None:
    """``state``'s first convolution adapted from 3 (RGB) input channels to the config's, in place."""
    key = _STEM_CONV if _STEM_CONV in state else _PATCH_CONV
    have, want = state[key].shape[1], expected[key][1] if key in expected else state[key].shape[1]
    if have == want:
        return
    if have != 3:
        raise ConfigError(
            f"{name}: a backbone of {have} input channels; the config has data.channels={want} "
            "(only an RGB backbone is adapted to another channel count)"
        )
    state[key] = adapt_input_conv(want, state[key])
    what = "conv stem's first convolution" if key == _STEM_CONV else "patch embedding"
    note = f"{what} adapted from 3 to {want} input channels"
    if note not in notes:
        notes.append(note)


def _grid(positions: int, name: str) -> int:
    """Side of the square patch grid of a position embedding of ``positions`` rows."""
    tokens = positions - 1  # after the [cls] token's
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise DataError(f"{name}: pos_embed of {tokens + 1} tokens is not 1 + a square grid")
    return side


def _fit_heads(
    source: _Source, expected: dict[str, torch.Size], shared: bool, notes: list[str]
) -> tuple[list[Tensors], str]:
    """Each branch's head entries and "", or no entries and why the heads start fresh (both
    branches alike: a student and a teacher with different heads would not be one method)."""
    why = ""
    for branch in (source.student, source.teacher):
        why = why or _heads_misfit(branch, expected)
    if why:
        return [{}, {}], why
    student, teacher = source.student.heads or {}, source.teacher.heads or {}
    if shared and ("patch" in student or "patch" in teacher):
        notes.append("the file's separate patch prototypes left out (model.shared_head=true)")
    return [_head_entries(student, shared), _head_entries(teacher, shared)], ""


def _heads_misfit(branch: _Branch, expected: dict[str, torch.Size]) -> str:
    if branch.heads is None:
        return branch.no_heads or "the file has no projection head"
    for head in branch.heads.values():
        if why := _head_mismatch(head, expected):
            return why
    return ""


def _head_mismatch(head: Tensors, expected: dict[str, torch.Size]) -> str:
    """Why ``head`` does not fit the config's head ("" when every key and shape matches)."""
    # The prototypes' weight (out_dim x bottleneck) says more than their norms (out_dim x 1).
    for key in sorted(expected, key=lambda k: (k.endswith("original0"), k)):
        name = key.replace(_WEIGHT_NORM["weight_v"], "weight").replace(_WEIGHT_NORM["weight_g"], "weight_g")
        if key not in head:
            return f"the file's head has no {name} (model.head_layers)"
        if head[key].shape != expected[key]:
            return f"head {name} is {tuple(head[key].shape)} in the file, {tuple(expected[key])} in the config"
    extra = sorted(set(head) - set(expected))
    return f"the file's head has {extra[0]}, the config's does not" if extra else ""


def _head_entries(heads: dict[str, Tensors], shared: bool) -> Tensors:
    if shared:
        return _prefixed(heads["cls"], "head.")
    return {**_prefixed(heads["cls"], "cls_head."), **_prefixed(heads.get("patch", heads["cls"]), "patch_head.")}


def _prefixed(state: Tensors, prefix: str) -> Tensors:
    return {f"{prefix}{k}": v for k, v in state.items()}
