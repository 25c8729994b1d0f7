"""``ibot export``: a run's backbone as a timm folder, a transformers ``ViTModel`` folder or ONNX.

Each format is written into a temporary sibling of ``--out``, loaded back by its own library
(timm's ``local-dir:``, ``AutoModel.from_pretrained``, onnxruntime) and compared with this
package's ``MaskedViT`` on random images at the run's evaluation size; only a copy that passes
is renamed to ``--out``. The weights are the backbone alone: no [mask] token, no heads.
The input channels are the run's ``data.channels``: timm's ``in_chans``, transformers'
``num_channels``, the ONNX input's (B, C, H, W); mean and std have C values each.

A CNN student of ``ibot distill`` (``distill.student=timm:NAME``) exports as timm's own ``NAME``
(its trunk alone: ``model(x)`` is the pooled [cls] feature, ``forward_features(x)`` the feature
map before it is resized to the token grid) or as ONNX of the whole student (cls and the patch
tokens on their grid); transformers has no such model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ibot.config import Config
from ibot.errors import ExportError
from ibot.eval.features import load_frozen
from ibot.extras import require
from ibot.models.cnn_student import TimmCNN, cnn_name
from ibot.models.vit import MaskedViT
from ibot.run_folder import RunFolder

FORMATS = ("timm", "hf", "onnx")
# Largest max abs difference between the exported copy and ``MaskedViT`` that passes the check.
TOLERANCES = {"timm": 1e-5, "hf": 1e-4, "onnx": 1e-4}
# The modules each format needs beyond the core dependencies, and the extra that installs them.
EXTRAS = {"timm": (), "hf": ("transformers",), "onnx": ("onnx", "onnxscript", "onnxruntime")}
# timm has every arch of ibot.config.ARCHS but vit_pico, exported as a narrower, shallower vit_tiny.
TIMM_FAMILIES = {"vit_pico": "vit_tiny"}
EXPORT_BATCH, CHECK_BATCH = 2, 3  # the ONNX check runs another batch size than the trace saw
MARKER = ".ibot-export.json"  # in every export: the folder ``--force`` may replace


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote: the folder, its files, the check's max abs difference, how long it took."""

    folder: Path
    files: tuple[str, ...]
    max_abs_diff: float
    tolerance: float
    seconds: float
    note: str = ""  # e.g. which ONNX exporter produced the graph


def require_extra(fmt: str) -> None:
    """One line naming the missing package and the extra that installs it."""
    for module in EXTRAS[fmt]:
        require(module, fmt, f"ibot export --format {fmt}")


def refuse_unexpressible(cfg: Config, fmt: str) -> None:
    """timm's and transformers' ViTs have a linear patchify and a plain MLP: say which key they lack."""
    if fmt == "onnx":
        return  # the graph is traced from MaskedViT itself: any backbone goes
    if name := cnn_name(cfg.distill.student):
        if fmt == "hf":
            raise ExportError(f"distill.student=timm:{name}: --format hf is for ViTs; use timm (timm's {name}) or onnx")
        return
    if cfg.model.stem != "patch":
        raise ExportError(f"model.stem={cfg.model.stem}: --format {fmt} has only a linear patch embedding; use onnx")
    if cfg.model.mlp_dwconv:
        raise ExportError(f"model.mlp_dwconv=true: --format {fmt} has no depthwise convolution in the MLP; use onnx")


def check_out(out: Path, force: bool, weights: str | Path) -> None:
    """``out`` must be new, an empty folder, or (with ``force``) a folder an earlier export wrote
    (it holds ``MARKER``); never the run folder (the weights file's folder) or a folder above it,
    inside a folder that holds a run, nor the working directory or a folder above it: replacing
    them would lose a run."""
    folder = RunFolder.of(weights)
    run = folder.root
    # A sub-folder of a run is refused (its files are the run's); next to a downloaded weights
    # file it is only a new folder. The folder itself or one above it never.
    if _within(run, out) or (_within(out, run) and (out.resolve() == run.resolve() or folder.holds_run())):
        raise ExportError(f"--out {out}: is, holds or lies inside the run folder {run}; choose a folder outside it")
    if _within(Path.cwd(), out):
        raise ExportError(f"--out {out}: is or holds the working directory; choose another folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out {out}: folder exists and is not empty (--force replaces an earlier export)")
        if not (out / MARKER).is_file():
            raise ExportError(
                f"--out {out}: holds files that ibot export did not write (no {MARKER}); "
                "--force replaces only an earlier export: choose another folder"
            )


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, links and ``..`` resolved."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def write_marker(folder: Path, fmt: str, weights: str | Path, diff: float) -> None:
    """``MARKER``: this folder is an export (what ``--force`` may replace), of what, checked how closely."""
    source = {"format": fmt, "source": str(Path(weights).resolve()), "max_abs_diff": diff}
    (folder / MARKER).write_text(json.dumps(source, indent=2) + "\n")


def tokens(backbone: MaskedViT, images: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, D): [cls] then the patch tokens, after the final norm."""
    out = backbone(images)
    return torch.cat([out.cls[:, None], out.patches], dim=1)


def check_images(cfg: Config, batch: int) -> torch.Tensor:
    """A fixed batch of normalised-image-like inputs at the evaluation size, of ``data.channels`` channels."""
    size = cfg.eval_image_size
    return torch.randn(batch, cfg.data.channels, size, size, generator=torch.Generator().manual_seed(0))


def pos_embed_at(backbone: MaskedViT, size: int) -> torch.Tensor:
    """The position embeddings resampled to a ``size`` x ``size`` input, as ``MaskedViT`` does per call."""
    from timm.layers import resample_abs_pos_embed

    vit = backbone.vit
    grid = size // backbone.patch_size
    if (grid, grid) == tuple(vit.patch_embed.grid_size):
        return vit.pos_embed.detach().clone()
    return resample_abs_pos_embed(vit.pos_embed.detach(), (grid, grid), num_prefix_tokens=vit.num_prefix_tokens)


def vit_tensors(backbone: MaskedViT) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` keys: the ``vit.`` entries without their prefix (no [mask] token)."""
    return {k: v.contiguous() for k, v in backbone.vit.state_dict().items()}


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Silence the libraries' info logs and warnings while they load the temporary copy (its path means nothing)."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# --- timm ---------------------------------------------------------------------------------------


def timm_architecture(cfg: Config) -> str:
    """A registered timm name of the same family; ``model_args`` set the actual shape."""
    import timm

    family = TIMM_FAMILIES.get(cfg.model.arch, cfg.model.arch)
    for name in (f"{family}_patch{cfg.model.patch_size}_224", f"{family}_patch16_224"):
        if timm.is_model(name):
            return name
    raise ExportError(f"model.arch={cfg.model.arch}: no timm model of this family is registered")


def pretrained_cfg(cfg: Config, first_conv: str, classifier: str) -> dict:
    """timm's ``pretrained_cfg``: the run's preprocessing at the evaluation size, no classifier."""
    size = cfg.eval_image_size
    return {
        "input_size": [cfg.data.channels, size, size],
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": cfg.eval.crop_ratio,
        "crop_mode": "center",
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "num_classes": 0,
        "first_conv": first_conv,
        "classifier": classifier,
    }


def timm_config(backbone: MaskedViT, cfg: Config) -> dict:
    """timm's ``config.json``: architecture, the shape in ``model_args``, preprocessing in ``pretrained_cfg``."""
    vit = backbone.vit
    return {
        "architecture": timm_architecture(cfg),
        "num_classes": 0,
        "num_features": vit.num_features,
        "global_pool": "token",
        "model_args": {
            "embed_dim": vit.embed_dim,
            "depth": len(vit.blocks),
            "num_heads": vit.blocks[0].attn.num_heads,
            "patch_size": backbone.patch_size,
            "in_chans": cfg.data.channels,
            "img_size": cfg.data.global_crop_size,  # the grid of the stored position embeddings
            "num_classes": 0,
            "dynamic_img_size": True,  # MaskedViT resamples them for any input size; so does timm then
        },
        "pretrained_cfg": pretrained_cfg(cfg, first_conv="patch_embed.proj", classifier="head"),
    }


def write_timm(backbone: MaskedViT, cfg: Config, folder: Path) -> None:
    """``config.json`` and ``model.safetensors`` for ``timm.create_model("local-dir:FOLDER", pretrained=True)``."""
    (folder / "config.json").write_text(json.dumps(timm_config(backbone, cfg), indent=2) + "\n")
    save_file(vit_tensors(backbone), str(folder / "model.safetensors"), metadata={"format": "pt"})


def check_timm(backbone: MaskedViT, cfg: Config, folder: Path) -> float:
    """Max abs difference of timm's ``forward_features`` (loaded strictly from ``folder``) to ``MaskedViT``."""
    import timm

    with quiet("timm"):  # timm's loading is strict: a missing or unexpected key raises
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = check_images(cfg, CHECK_BATCH)
    with torch.no_grad():
        return (model.forward_features(images) - tokens(backbone, images)).abs().max().item()


def timm_cnn_config(backbone: TimmCNN, cfg: Config) -> dict:
    """timm's ``config.json`` of a CNN student: its own architecture name, no classifier, the run's preprocessing."""
    own = backbone.cnn.pretrained_cfg
    return {
        "architecture": backbone.name,
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "model_args": {"in_chans": cfg.data.channels, "num_classes": 0},
        "pretrained_cfg": pretrained_cfg(cfg, own.get("first_conv", ""), own.get("classifier", "")),
    }


def write_timm_cnn(backbone: TimmCNN, cfg: Config, folder: Path) -> None:
    """``config.json`` and ``model.safetensors`` (the timm model's own keys: the trunk, no projection)."""
    (folder / "config.json").write_text(json.dumps(timm_cnn_config(backbone, cfg), indent=2) + "\n")
    tensors = {k: v.contiguous() for k, v in backbone.cnn.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def check_timm_cnn(backbone: TimmCNN, cfg: Config, folder: Path) -> float:
    """Max abs difference of timm's ``model(x)`` to the student's [cls] and of its ``forward_features``
    to the student's feature map (loaded strictly from ``folder``, in eval mode: BatchNorm's running statistics)."""
    import timm

    with quiet("timm"):
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = check_images(cfg, CHECK_BATCH)
    with torch.no_grad():
        ours = backbone(images)
        return max(
            (model(images) - ours.cls).abs().max().item(),
            (model.forward_features(images) - backbone.cnn.forward_features(images)).abs().max().item(),
        )


# --- transformers ---------------------------------------------------------------------------------


def hf_tensors(backbone: MaskedViT, size: int) -> dict[str, torch.Tensor]:
    """``ViTModel`` keys: timm's fused qkv split in query/key/value; position embeddings for ``size``."""
    vit = backbone.vit
    out = {
        "embeddings.cls_token": vit.cls_token,
        "embeddings.position_embeddings": pos_embed_at(backbone, size),
        "embeddings.patch_embeddings.projection.weight": vit.patch_embed.proj.weight,
        "embeddings.patch_embeddings.projection.bias": vit.patch_embed.proj.bias,
        "layernorm.weight": vit.norm.weight,
        "layernorm.bias": vit.norm.bias,
    }
    for i, block in enumerate(vit.blocks):
        layer = f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            for name, chunk in zip(("query", "key", "value"), getattr(block.attn.qkv, part).chunk(3)):
                out[f"{layer}attention.attention.{name}.{part}"] = chunk
            out[f"{layer}attention.output.dense.{part}"] = getattr(block.attn.proj, part)
            out[f"{layer}layernorm_before.{part}"] = getattr(block.norm1, part)
            out[f"{layer}layernorm_after.{part}"] = getattr(block.norm2, part)
            out[f"{layer}intermediate.dense.{part}"] = getattr(block.mlp.fc1, part)
            out[f"{layer}output.dense.{part}"] = getattr(block.mlp.fc2, part)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def write_hf(backbone: MaskedViT, cfg: Config, folder: Path) -> None:
    """``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` of a ``ViTModel``.

    No pooler weights: iBOT trains none, so ``from_pretrained(folder, add_pooling_layer=False)``
    is the loading that initialises nothing at random (docs/export.md).
    """
    from transformers import ViTConfig, ViTImageProcessor

    vit = backbone.vit
    size = cfg.eval_image_size
    config = ViTConfig(
        hidden_size=vit.embed_dim,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=vit.blocks[0].attn.num_heads,
        intermediate_size=vit.blocks[0].mlp.fc1.out_features,
        hidden_act="gelu",  # exact erf GELU, timm's nn.GELU
        layer_norm_eps=1e-6,  # timm's ViT LayerNorm, not transformers' 1e-12 default
        image_size=size,
        patch_size=backbone.patch_size,
        num_channels=cfg.data.channels,
        encoder_stride=backbone.patch_size,
        qkv_bias=True,  # MaskedViT's blocks always have one (timm's default)
        architectures=["ViTModel"],
    )
    config.save_pretrained(folder)
    save_file(hf_tensors(backbone, size), str(folder / "model.safetensors"), metadata={"format": "pt"})
    processor = ViTImageProcessor(
        size={"height": size, "width": size},
        resample=3,  # PIL bicubic, as the evaluation transform
        image_mean=list(cfg.data.mean),
        image_std=list(cfg.data.std),
    )
    processor.save_pretrained(folder)


def check_hf(backbone: MaskedViT, cfg: Config, folder: Path) -> float:
    """Max abs difference of ``ViTModel``'s ``last_hidden_state`` (loaded from ``folder``) to ``MaskedViT``."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with quiet("transformers"):
            model, info = AutoModel.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True)
    finally:
        hf_logging.enable_progress_bar()
    unloaded = sorted({k for v in info.values() for k in v})
    if unloaded:
        raise ExportError(f"{folder}: transformers did not load {', '.join(unloaded[:3])} as written")
    images = check_images(cfg, CHECK_BATCH)
    with torch.no_grad():
        return (model.eval()(pixel_values=images).last_hidden_state - tokens(backbone, images)).abs().max().item()


# --- ONNX -------------------------------------------------------------------------------------------


class _TokenOutputs(torch.nn.Module):
    """``MaskedViT`` with plain tensor outputs: ``cls`` (B, D) and ``patch_tokens`` (B, N, D)."""

    def __init__(self, backbone: MaskedViT) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(images)
        return out.cls, out.patches


ONNX_NAMES = {"input_names": ["images"], "output_names": ["cls", "patch_tokens"]}


def _onnx_dynamo(model: torch.nn.Module, images: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch")
    # One file: the largest backbone (vit_large, 1.2 GB) is under protobuf's 2 GB limit.
    torch.onnx.export(
        model,
        (images,),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: batch},),
        external_data=False,
        verbose=False,
        **ONNX_NAMES,
    )


def _onnx_torchscript(model: torch.nn.Module, images: torch.Tensor, path: Path) -> None:
    axes = {name: {0: "batch"} for name in ("images", "cls", "patch_tokens")}
    torch.onnx.export(model, (images,), str(path), dynamo=False, opset_version=18, dynamic_axes=axes, **ONNX_NAMES)


ONNX_EXPORTERS: dict[str, Callable[[torch.nn.Module, torch.Tensor, Path], None]] = {
    "torch.export (dynamo)": _onnx_dynamo,
    "TorchScript": _onnx_torchscript,
}


def at_size(backbone: MaskedViT, size: int) -> MaskedViT:
    """A copy of ``backbone`` whose position embeddings are already resampled to ``size`` (same outputs there).

    The graph then holds no antialiased bicubic resampling, which the TorchScript exporter
    cannot translate; the exported model takes ``size`` x ``size`` images only.
    """
    copy = deepcopy(backbone)
    grid = size // backbone.patch_size
    copy.vit.pos_embed = torch.nn.Parameter(pos_embed_at(backbone, size), requires_grad=False)
    copy.vit.patch_embed.img_size = (size, size)
    copy.vit.patch_embed.grid_size = (grid, grid)
    copy.vit.patch_embed.num_patches = grid * grid
    return copy


def write_onnx(backbone: MaskedViT | TimmCNN, cfg: Config, folder: Path) -> str:
    """``model.onnx`` at the evaluation size with a dynamic batch axis; returns the exporter that made it.

    torch.export comes first; the TorchScript exporter is the fallback for what it cannot trace.
    A CNN student has no position embeddings to fix: it is traced as it is.
    """
    fixed = backbone if cnn_name(cfg.distill.student) else at_size(backbone, cfg.eval_image_size)
    model = _TokenOutputs(fixed).eval()
    images = check_images(cfg, EXPORT_BATCH)
    failures = []
    for name, exporter in ONNX_EXPORTERS.items():
        for leftover in folder.iterdir():  # a failed exporter may have written part of a file
            leftover.unlink()
        try:
            with quiet("torch.onnx", "onnxscript", "onnx_ir"), torch.no_grad():
                exporter(model, images, folder / "model.onnx")
            return name
        except Exception as exc:  # noqa: BLE001 - any exporter failure moves on to the next one
            failures.append(f"{name}: {type(exc).__name__}")
    raise ExportError(f"no ONNX exporter could trace the backbone ({'; '.join(failures)})")


def check_onnx(backbone: MaskedViT, cfg: Config, folder: Path) -> float:
    """Max abs difference of onnxruntime's outputs to ``MaskedViT`` on a batch the trace did not see."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    images = check_images(cfg, CHECK_BATCH)
    cls, patches = session.run(["cls", "patch_tokens"], {"images": images.numpy()})
    with torch.no_grad():
        out = backbone(images)
    return max(
        (torch.from_numpy(cls) - out.cls).abs().max().item(),
        (torch.from_numpy(patches) - out.patches).abs().max().item(),
    )


# --- the command ------------------------------------------------------------------------------------


def write_and_check(backbone: MaskedViT, cfg: Config, fmt: str, folder: Path) -> tuple[float, str]:
    """Write ``fmt`` into ``folder``, load it back, compare: (max abs difference, note)."""
    if fmt == "timm" and cnn_name(cfg.distill.student):
        write_timm_cnn(backbone, cfg, folder)
        return check_timm_cnn(backbone, cfg, folder), ""
    if fmt == "timm":
        write_timm(backbone, cfg, folder)
        return check_timm(backbone, cfg, folder), ""
    if fmt == "hf":
        write_hf(backbone, cfg, folder)
        return check_hf(backbone, cfg, folder), ""
    exporter = write_onnx(backbone, cfg, folder)
    return check_onnx(backbone, cfg, folder), f"exporter: {exporter}"


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and its files the modes of newly made ones (mkdtemp and safetensors make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(weights: str | Path, fmt: str, out: str | Path, force: bool = False) -> Exported:
    """Write the backbone at ``weights`` (a run folder, its teacher.safetensors, a foreign ViT) as ``fmt`` in ``out``.

    ``out`` appears whole or not at all: the files go to a temporary sibling folder, which is
    renamed only after the check passed and removed on any failure.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    start = time.monotonic()
    require_extra(fmt)
    out = Path(out)
    check_out(out, force, weights)
    frozen = load_frozen(str(weights), on_cpu=True)
    backbone, cfg = frozen.backbone, frozen.cfg
    refuse_unexpressible(cfg, fmt)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write beside it ({exc.strerror or type(exc).__name__})") from None
    try:
        diff, note = write_and_check(backbone, cfg, fmt, tmp)
        if not diff <= TOLERANCES[fmt]:  # also catches NaN
            raise ExportError(
                f"{out}: the {fmt} copy differs from the backbone by {diff:.2e} "
                f"(> {TOLERANCES[fmt]:.0e}); nothing written"
            )
        files = tuple(sorted(p.name for p in tmp.iterdir()))
        write_marker(tmp, fmt, weights, diff)
        apply_umask(tmp)
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out, files, diff, TOLERANCES[fmt], time.monotonic() - start, note)
