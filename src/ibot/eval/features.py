"""Frozen backbones for evaluation (``load_frozen``) and the one feature-extraction pass every probe
uses (cached on disk).

Every evaluation reads its labelled folders here: a test folder through ``build_eval_dataset``
/ ``extract_features`` with the train folder's ``TrainClasses``, so its labels are the train
folder's class indices by name (``ibot.data.labels``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ibot.config import Config, config_from_dict
from ibot.data.collate import skips_of
from ibot.data.datasets import Sample, files_digest
from ibot.data.labels import TrainClasses, align_to, dataset_classes, dataset_files
from ibot.data.loaders import dataset_from_config
from ibot.data.skips import Skip, SkipLog
from ibot.data.transforms import build_eval_transform
from ibot.errors import ConfigError, DataError, IBOTError
from ibot.models.cnn_student import TimmCNN, cnn_name
from ibot.models.fit import frozen_backbone
from ibot.models.reader import read_backbone
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime
from ibot.storage import atomic_write

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Features:
    """Frozen tokens of a labelled folder, after the final norm.

    ``cls`` (X, L, D) fp32: [cls] of the last L blocks, the last block last; ``patches``
    (X, N, D) fp16 or None: the last block's patch tokens; ``labels`` (X,), indices into
    ``classes`` (the train folder's, for a test folder read with them); ``skips``: the files
    left out, and why (scan, label mapping and decoding).
    """

    cls: torch.Tensor
    labels: torch.Tensor
    patches: torch.Tensor | None = None
    skips: tuple[Skip, ...] = ()
    classes: tuple[str, ...] = ()

    @property
    def skipped(self) -> int:
        return len(self.skips)

    @property
    def last_cls(self) -> torch.Tensor:
        """(X, D) [cls] of the last block: the k-NN protocol's feature."""
        return self.cls[:, -1]


@dataclass(frozen=True)
class Frozen:
    """A frozen backbone with its config (overrides applied) and runtime."""

    backbone: MaskedViT | TimmCNN  # TimmCNN: a CNN student of ibot distill
    cfg: Config
    runtime: Runtime


def load_frozen(
    weights: str,
    overrides: tuple[str, ...] = (),
    random_init: bool = False,
    finetune: bool = False,
    on_cpu: bool = False,
) -> Frozen:
    """The backbone at ``weights`` (a run folder, its ``teacher.safetensors`` or a foreign ViT) in
    eval mode with its config: on its runtime's device with ``train.threads`` applied, or
    (``on_cpu``: export, pictures) on the CPU with the process's threads left alone.

    The weights file is read once for weights and config; the ``overrides`` apply before the
    backbone is built (``finetune``: with ``finetune.drop_path``; ``random_init``: the same
    architecture untrained, the baseline of the same shape).
    """
    tensors, cfg = _read(weights, overrides)
    if finetune and (name := cnn_name(cfg.distill.student)):
        raise ConfigError(f"{weights}: ibot eval finetune decays the learning rate by ViT block; not for timm:{name}")
    drop_path = cfg.finetune.drop_path if finetune else 0.0
    backbone = frozen_backbone(cfg, None if random_init else tensors, weights, drop_path_rate=drop_path)
    if on_cpu:
        cfg = replace(cfg, train=replace(cfg.train, device="cpu"))
    elif cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    runtime = Runtime.resolve(cfg.train)
    return Frozen(backbone.to(runtime.device), cfg, runtime)


def _read(path: str, overrides: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], Config]:
    """The backbone tensors at ``path`` (``ibot.models.reader``: a folder's teacher backbone) and
    their config with ``overrides`` applied."""
    tensors, config_dict = read_backbone(path)
    cfg = config_from_dict(config_dict, list(overrides))
    if cfg.data.auto_stats:
        # An N-channel weights file without its run's config, or an "auto" override: pre-training
        # measures auto once and writes the numbers; evaluating with other numbers would lie.
        given = (
            "data.mean / data.std=auto is measured by ibot pretrain only"
            if any(o.split("=", 1)[0] in ("data.mean", "data.std") for o in overrides)
            else f"a {cfg.data.channels}-channel backbone whose data.mean / data.std are unknown"
        )
        raise ConfigError(
            f"{path}: {given}; give data.mean=[...] data.std=[...] "
            f"({cfg.data.channels} values each; `ibot stats DIR` measures them)"
        )
    return tensors, cfg


def collate_eval(items: list[Sample | Skip]) -> tuple[torch.Tensor, torch.Tensor, tuple[Skip, ...]]:
    """(images, labels, the skipped files with their reasons) of one batch."""
    samples = [s for s in items if isinstance(s, Sample)]
    if not samples:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skips_of(items)
    images = torch.stack([s.view for s in samples])
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return images, labels, skips_of(items)


def build_eval_dataset(folder: str, cfg: Config, train: TrainClasses | None = None) -> Dataset:
    """``folder`` (or shards) under the DINO evaluation transform of ``cfg``.

    With ``train`` (a test folder): labelled by the train folder's class indices (``align_to``).
    """
    transform = build_eval_transform(cfg.eval_image_size, cfg.eval.crop_ratio, cfg.data.mean, cfg.data.std)
    return aligned_dataset(dataset_from_config(folder, transform, cfg.data), folder, train)


def aligned_dataset(dataset: Dataset, folder: str, train: TrainClasses | None) -> Dataset:
    """``dataset`` of ``folder``, labelled by ``train``'s class indices when given (as it is)."""
    return dataset if train is None else align_to(dataset, folder, train)


def train_classes(source: object, folder: str, cfg: Config, purpose: str) -> TrainClasses:
    """The classes of the train folder ``folder`` (its dataset or features) for its test folder.

    One line when it has fewer than 2 classes; ``eval.unknown_test_classes`` says what a test
    class it lacks does.
    """
    return TrainClasses.of(source, folder, cfg.eval.unknown_test_classes, purpose)


def eval_dataset_pair(train_dir: str, test_dir: str, cfg: Config, purpose: str) -> list[Dataset]:
    """Both folders under the evaluation transform, the test one labelled by the train classes."""
    train = build_eval_dataset(train_dir, cfg)
    return [train, build_eval_dataset(test_dir, cfg, train_classes(train, train_dir, cfg, purpose))]


def dataset_skips(dataset: Dataset) -> SkipLog:
    """The dataset's skip log (scan and in-process decoding); empty for a dataset without one."""
    log = getattr(dataset, "skips", None)
    return log if log is not None else SkipLog()


def labelled_subset(dataset: Dataset, folder: str, size: int, seed: int, purpose: str) -> list[Sample]:
    """The first ``size`` readable images of a ``seed``-ed permutation of ``dataset`` (all if fewer).

    One-line errors name ``folder`` when nothing is readable or the images have no class folders.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    samples: list[Sample] = []
    for i in order:
        if len(samples) == size:
            break
        sample = dataset[i]
        if isinstance(sample, Sample):
            samples.append(sample)
    if not samples:
        raise IBOTError(f"{folder}: no readable images for {purpose}; {dataset_skips(dataset).summary('scan')}")
    require_labels([s.label for s in samples], folder, purpose)
    return samples


@dataclass(frozen=True)
class Encoded:
    """A frozen backbone's tokens of some images, on the CPU: ``cls`` (X, L, D) fp32 of the last L
    blocks (the last block last), ``patches`` (X, N, D) of the last block or None."""

    cls: torch.Tensor
    patches: torch.Tensor | None


@torch.no_grad()
def encode(
    backbone: MaskedViT,
    images: torch.Tensor,
    runtime: Runtime,
    n_last: int = 1,
    patch_dtype: torch.dtype | None = None,
    batch_size: int = 0,
) -> Encoded:
    """(X, C, S, S) images -> their ``Encoded`` tokens, ``batch_size`` images at a time (0: all at once).

    The one place a frozen backbone meets images: autocast as the run's precision, tokens after
    the final norm; patch tokens are kept only with ``patch_dtype`` (fp16 halves a cache).
    """
    cls_parts, patch_parts = [], []
    for chunk in images.split(batch_size or max(len(images), 1)):
        with runtime.autocast():
            tokens = backbone.forward_intermediates(chunk.to(runtime.device), n_last)
        cls_parts.append(torch.stack([t.cls.float() for t in tokens], dim=1).cpu())
        if patch_dtype is not None:
            patch_parts.append(tokens[-1].patches.to(patch_dtype).cpu())
    return Encoded(torch.cat(cls_parts), torch.cat(patch_parts) if patch_dtype is not None else None)


def cls_features(backbone: MaskedViT, images: torch.Tensor, runtime: Runtime, batch_size: int = 0) -> torch.Tensor:
    """(X, C, S, S) images -> (X, D) fp32 [cls] of the last block, on the CPU."""
    return encode(backbone, images, runtime, batch_size=batch_size).cls[:, -1]


def require_labels(labels: torch.Tensor | list[int], source: str, purpose: str) -> None:
    """One line naming ``source`` when an image has no class (-1: a folder without class sub-folders)."""
    labels = torch.as_tensor(labels)
    if labels.numel() == 0 or bool((labels < 0).any()):
        raise DataError(f"{source}: {purpose} needs labelled images, one sub-folder per class")


@torch.no_grad()
def extract_features(
    backbone: MaskedViT,
    folder: str,
    cfg: Config,
    runtime: Runtime,
    num_workers: int = 2,
    progress: bool = True,
    n_last: int = 1,
    patches: bool = False,
    cache_dir: str | Path | None = None,
    train: TrainClasses | None = None,
    dataset: Dataset | None = None,
    pending: list[Callable[[], None]] | None = None,
) -> Features:
    """[cls] of the last ``n_last`` blocks (and the last block's patch tokens) for ``folder``.

    With ``train`` (``folder`` is a test folder) the labels are ``train``'s class indices; or
    ``dataset``: ``folder`` already read by ``build_eval_dataset``.
    With ``cache_dir`` the result is stored there under a key of the weights, the files (each
    one's path, size and time), the class names, the transform and what was extracted, and
    later calls with the same key read it back; an entry that does not load is replaced.
    With ``pending`` the cache write is appended there instead of done: a caller that may still
    refuse (the other folder of a pair) writes only once nothing can.
    """
    dataset = build_eval_dataset(folder, cfg, train) if dataset is None else dataset
    classes = dataset_classes(dataset)
    cache = None
    if cache_dir is not None:
        key = _cache_key(backbone, folder, dataset, classes, cfg, runtime, n_last, patches)
        cache = Path(cache_dir) / f"{key}.safetensors"
        cached = _read_cache(cache) if cache.is_file() else None
        if cached is not None:
            return cached
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=num_workers, collate_fn=collate_eval)
    backbone = backbone.to(runtime.device)
    cls_parts, patch_parts, labels = [], [], []
    skips = dataset_skips(dataset)
    for images, batch_labels, batch_skips in tqdm(loader, desc=f"features {folder}", disable=not progress):
        skips.extend(batch_skips)  # decoded in the loader workers: their copies of the log are lost
        if images.numel() == 0:
            continue
        encoded = encode(backbone, images, runtime, n_last, torch.float16 if patches else None)
        cls_parts.append(encoded.cls)
        if encoded.patches is not None:
            patch_parts.append(encoded.patches)
        labels.append(batch_labels)
    if not labels:
        raise IBOTError(f"{folder}: no readable images to extract features from; {skips.summary('features')}")
    features = Features(
        torch.cat(cls_parts),
        torch.cat(labels),
        torch.cat(patch_parts) if patches else None,
        tuple(skips.sorted()),
        classes,
    )
    if cache is not None:
        write = functools.partial(_write_cache, cache, features)
        if pending is None:
            write()
        else:
            pending.append(write)
    return features


def _cache_key(
    backbone: MaskedViT,
    folder: str,
    dataset: Dataset,
    classes: tuple[str, ...],
    cfg: Config,
    runtime: Runtime,
    n_last: int,
    patches: bool,
) -> str:
    """Weights (by content), files (path, size, time of each), class names, transform, outputs.

    A file rewritten under the same name, a file added or removed at any depth, or another
    class list all make another key: a cache never answers for data it was not made from.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        # reshape: a 0-d tensor (BatchNorm's num_batches_tracked of a CNN student) has no byte view
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    described = {
        "folder": str(Path(folder).resolve()),
        "files": files_digest(dataset_files(dataset)),
        "images": len(dataset),  # the label mapping may leave some out
        "classes": list(classes),
        "transform": repr(getattr(dataset, "transform", None)),
        "image_size": cfg.eval_image_size,
        "crop_ratio": cfg.eval.crop_ratio,
        "max_image_pixels": cfg.data.max_image_pixels,  # changes which images are skipped
        # How stored values become [0, 1] (ibot.data.reading): an override changes every pixel.
        "reading": [cfg.data.intensity, list(cfg.data.intensity_percentiles), list(cfg.data.intensity_window)],
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "precision": runtime.precision,
        "n_last": n_last,
        "patches": patches,
    }
    digest.update(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def _write_cache(path: Path, features: Features) -> None:
    tensors = {"cls": features.cls, "labels": features.labels}
    if features.patches is not None:
        tensors["patches"] = features.patches
    metadata = {"skips": json.dumps([list(s) for s in features.skips]), "classes": json.dumps(list(features.classes))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read_cache(path: Path) -> Features | None:
    """The cached features; None, with one warning and the file removed, when it does not load."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        skips = tuple(Skip(*s) for s in json.loads(metadata.get("skips", "[]")))
        classes = tuple(str(c) for c in json.loads(metadata.get("classes", "[]")))
        tensors = load_file(str(path))
        features = Features(tensors["cls"], tensors["labels"], tensors.get("patches"), skips, classes)
        if len(features.cls) != len(features.labels):
            raise ValueError("features and labels differ in length")
    except Exception as exc:  # noqa: BLE001 - whatever a truncated or foreign file raises: computed again
        reason = (str(exc).splitlines() or [""])[0][:120]
        logger.warning(
            "%s: unreadable feature cache (%s: %s); removed, computing again", path, type(exc).__name__, reason
        )
        path.unlink(missing_ok=True)
        return None
    return features
