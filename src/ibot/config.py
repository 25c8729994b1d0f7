"""Typed run configuration: dataclass defaults < YAML deltas < dotted command-line overrides.

Loading is strict: an unknown key is a ``ConfigError`` that lists the valid keys (and the
closest one), and values are coerced to the annotated type. Values derived from the config
(scaled learning rate, steps per epoch) live in ``RunPlan``, never back in the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ibot.errors import ConfigError

# The choices of loss.*_centering and mim.target (``ibot.losses`` builds them): named here so
# that the config, at the bottom of the package, imports nothing above it.
CENTERINGS = ("ema", "sinkhorn_knopp", "none")
MIM_TARGETS = ("online", "none", "random", "frozen", "vq")

ARCHS: dict[str, dict[str, int]] = {
    "vit_pico": dict(embed_dim=48, depth=2, num_heads=2),  # for tests and smoke runs
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTIONS = ("auto", "sdpa", "explicit")
RESIDUAL_PRECISIONS = ("auto", "fp32", "amp")
LOGGERS = ("tensorboard", "mlflow", "wandb")  # train.loggers: metrics.jsonl is always written
PIPELINES = ("pil", "device")
# data.intensity: how stored pixel values become [0, 1] (ibot.data.reading).
INTENSITIES = ("dtype", "minmax", "percentile", "window")
# Keys whose value may be "auto" (kept as the empty tuple until a run measures it).
AUTO_KEYS = ("data.mean", "data.std")
# The keys a resume may change when ``train.resume_allow_changes`` names them: the run goes on
# over other images or in other batches. The model and the world size never change on resume.
RESUME_CHANGES = ("data.path", "data.batch_size")
# distill.objective / distill.regression_loss (ibot.distill_method).
DISTILL_OBJECTIVES = ("auto", "prototypes", "regression", "ema_head")
REGRESSION_LOSSES = ("cosine", "smooth_l1")


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how each one becomes 2 global + n local crops."""

    path: str = ""
    format: str = "auto"  # "folder" (image folders), "shards" (WebDataset-style .tar files) or "auto"
    index_cache: str = "~/.cache/ibot"  # where file lists of large folders are cached; "" disables
    # Images of more pixels are skipped unread (PIL's decompression-bomb limit, the
    # default of ibot.data.decode.DEFAULT_MAX_PIXELS); 0 = no limit.
    max_image_pixels: int = 89_478_485
    # Where the augmentations run. "pil": all of them in the loader workers (torchvision on PIL
    # images, the official pipeline). "device": the workers decode (at reduced size where the
    # crops allow) and cut uint8 crops; flip, colour jitter, grayscale, blur, solarize and
    # normalisation run batched on the training device, every random draw still made from the
    # image's seed (ibot.data.crop_plan, ibot.data.photometric).
    pipeline: str = "pil"
    batch_size: int = 64  # per process
    num_workers: int = 4
    global_crop_size: int = 224
    local_crop_size: int = 96
    num_local_crops: int = 10
    global_crop_scale: tuple[float, float] = (0.25, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.25)
    # Official probabilities; tiny images (CIFAR) lose most of their content to blur, so
    # small-image recipes turn it down.
    global_blur_prob: tuple[float, float] = (1.0, 0.1)  # global crop 1, global crop 2
    local_blur_prob: float = 0.5
    solarize_prob: float = 0.2  # second global crop only
    # Official colour augmentation: jitter (brightness, contrast, saturation, hue) applied with
    # probability color_jitter_prob, then grayscale. Small, short runs may want less: colour
    # is much of what a weak CIFAR feature can use for k-NN (docs/cifar10.md).
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    # What the model sees: channels per pixel. A 1-channel image is repeated for 3 channels;
    # any other difference skips the file ("channels differ from data.channels").
    channels: int = 3
    # Stored values -> [0, 1], per image (ibot.data.reading): "dtype" divides by the stored type's
    # range (8-bit: / 255, 16-bit: / 65535); "minmax" and "percentile" stretch each channel
    # between its own extremes / percentiles (intensity_percentiles); "window" maps the fixed
    # stored values intensity_window = [lo, hi] (a CT window) to [0, 1]. Clipped to [0, 1].
    intensity: str = "dtype"
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    intensity_window: tuple[float, float] = (0.0, 1.0)
    # Per channel, after the intensity mapping; "auto" measures them over a sample of data.path
    # at the start (cached beside the file index) and writes the numbers into the run's config.
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        _check(self.format in ("auto", "folder", "shards"), "data.format", "must be auto, folder or shards")
        _check(self.pipeline in PIPELINES, "data.pipeline", f"must be one of {', '.join(PIPELINES)}")
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.max_image_pixels >= 0, "data.max_image_pixels", "must be >= 0 (0: no limit)")
        _check(self.num_local_crops >= 0, "data.num_local_crops", "must be >= 0")
        for key in ("global_crop_size", "local_crop_size"):
            _check(getattr(self, key) >= 1, f"data.{key}", "must be >= 1")
        for key in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, key)
            _check(0 < lo <= hi <= 1, f"data.{key}", "must satisfy 0 < min <= max <= 1")
        for key in ("local_blur_prob", "solarize_prob", "color_jitter_prob", "grayscale_prob"):
            _check(0 <= getattr(self, key) <= 1, f"data.{key}", "must be in [0, 1]")
        _check(all(0 <= p <= 1 for p in self.global_blur_prob), "data.global_blur_prob", "must be in [0, 1]")
        _check(all(v >= 0 for v in self.color_jitter), "data.color_jitter", "must be >= 0")
        _check(self.color_jitter[3] <= 0.5, "data.color_jitter", "hue must be <= 0.5")
        _check(all(s > 0 for s in self.std), "data.std", "must be > 0 (the normalisation divides by it)")
        _check(self.channels >= 1, "data.channels", "must be >= 1")
        _check(self.intensity in INTENSITIES, "data.intensity", f"must be one of {', '.join(INTENSITIES)}")
        lo, hi = self.intensity_percentiles
        _check(0 <= lo < hi <= 100, "data.intensity_percentiles", "must satisfy 0 <= low < high <= 100")
        lo, hi = self.intensity_window
        _check(lo < hi, "data.intensity_window", "must satisfy low < high")
        for key in ("mean", "std"):
            n = len(getattr(self, key))
            _check(
                n in (0, self.channels),
                f"data.{key}",
                f"has {n} values for data.channels={self.channels}: give {self.channels}, or auto"
                " (measured at the start; `ibot stats DIR` prints them)",
            )

    @property
    def auto_stats(self) -> bool:
        """Whether ``data.mean`` / ``data.std`` are still to be measured (``auto``)."""
        return not self.mean or not self.std


@dataclass(frozen=True)
class MaskConfig:
    """Which patches of the global crops the student sees as [mask] tokens (iBOT defaults)."""

    mode: str = "block"  # "block" (BEiT-style rectangles) or "random"
    probability: float = 0.5  # chance that a global crop is masked at all
    ratio: float = 0.3  # mean fraction of patches masked in a masked crop
    ratio_var: float = 0.2  # ratio ~ U(ratio - var, ratio + var)
    min_block_patches: int = 4  # smallest rectangle the block generator places

    def __post_init__(self) -> None:
        _check(self.mode in ("block", "random"), "mask.mode", "must be 'block' or 'random'")
        _check(0 <= self.probability <= 1, "mask.probability", "must be in [0, 1]")
        _check(
            0 <= self.ratio - self.ratio_var and self.ratio + self.ratio_var < 1,
            "mask.ratio",
            "ratio +/- ratio_var must stay within [0, 1)",
        )
        _check(self.min_block_patches >= 1, "mask.min_block_patches", "must be >= 1")


@dataclass(frozen=True)
class MimConfig:
    """Where the masked-patch targets come from: iBOT's online tokenizer, or an ablation of it."""

    # online (iBOT), none (plain DINO: no masks, no patch loss), random (a frozen random-init
    # teacher), frozen (the teacher of an earlier run, mim.tokenizer_path) or vq (the teacher's
    # patch tokens quantised to a learned codebook of model.out_dim codes).
    target: str = "online"
    tokenizer_path: str = ""  # frozen: an earlier run's folder or checkpoint.pt (same model.*)
    codebook_decay: float = 0.99  # vq: EMA k-means decay of the codebook
    codebook_restart_steps: int = 100  # vq: a code unused this many steps restarts at a batch token

    def __post_init__(self) -> None:
        _check(self.target in MIM_TARGETS, "mim.target", f"must be one of {', '.join(MIM_TARGETS)}")
        _check(0 <= self.codebook_decay < 1, "mim.codebook_decay", "must be in [0, 1)")
        _check(self.codebook_restart_steps >= 1, "mim.codebook_restart_steps", "must be >= 1")
        _check(
            self.target != "frozen" or bool(self.tokenizer_path), "mim.tokenizer_path", "needed by mim.target=frozen"
        )


@dataclass(frozen=True)
class ModelConfig:
    """Backbone (timm ViT) and projection head shapes."""

    arch: str = "vit_small"
    depth: int = 0  # blocks; 0 = the arch's (a shallower ViT makes more steps in a short budget)
    patch_size: int = 16
    stem: str = "patch"  # "patch" (linear patchify) or "conv" (3x3 stride-2 convolutions)
    stem_convs_per_stage: int = 1  # conv stem: 3x3 convolutions per stride-2 stage (extra ones stride 1)
    mlp_dwconv: bool = False  # a 3x3 depthwise convolution over the patch grid in each block's MLP (LocalViT)
    drop_path_rate: float = 0.1  # stochastic depth, linear ramp over the blocks (iBOT)
    efficient_drop_path: bool = True  # run dropped residual branches on kept samples only
    out_dim: int = 8192  # K prototypes
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True  # fix the prototype norms to 1 (DINO's stabiliser)
    shared_head: bool = True  # one head for [cls] and patch tokens
    # Weights a new run starts from (student and teacher): a run folder, one of its checkpoints or
    # its teacher.safetensors, an official iBOT/DINO checkpoint, or a timm/DINO/iBOT/DINOv2 ViT
    # state dict (ibot.models.init_weights; docs/init-from.md). A resumed run ignores it.
    init_from: str = ""

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, "model.arch", f"must be one of {sorted(ARCHS)}")
        _check(self.depth >= 0, "model.depth", "must be >= 0 (0 = the arch's depth)")
        _check(self.patch_size >= 1, "model.patch_size", "must be >= 1")
        _check(self.stem in ("patch", "conv"), "model.stem", "must be 'patch' or 'conv'")
        power_of_two = self.patch_size >= 2 and not self.patch_size & (self.patch_size - 1)
        _check(self.stem != "conv" or power_of_two, "model.stem", "conv needs a power-of-two model.patch_size >= 2")
        _check(self.stem_convs_per_stage >= 1, "model.stem_convs_per_stage", "must be >= 1")
        _check(self.out_dim >= 2, "model.out_dim", "must be >= 2")
        _check(self.head_layers >= 1, "model.head_layers", "must be >= 1")
        for key in ("head_hidden_dim", "head_bottleneck_dim"):
            _check(getattr(self, key) >= 1, f"model.{key}", "must be >= 1")
        _check(0 <= self.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")


@dataclass(frozen=True)
class LossConfig:
    """Temperatures, centering and weights of the [cls] (DINO) and patch (iBOT) losses."""

    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    center_momentum: float = 0.9  # ema centering only
    # Teacher targets per branch: ema (DINO/iBOT), sinkhorn_knopp (DINOv2) or none (an ablation).
    cls_centering: str = "ema"
    patch_centering: str = "ema"
    # Sharpening per branch; false = the teacher uses the student's temperature (an ablation).
    cls_sharpening: bool = True
    patch_sharpening: bool = True
    cls_weight: float = 1.0
    patch_weight: float = 1.0
    koleo_weight: float = 0.0  # KoLeo on the student's global [cls] tokens (DINOv2 uses 0.1); 0 = off
    # constant (DINOv2) or cosine from koleo_weight to 0 over the run, to stop pushing nearest
    # [cls] neighbours apart once the anti-collapse job is done (CIFAR-10: no k-NN gain measured).
    koleo_schedule: str = "constant"

    def __post_init__(self) -> None:
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            _check(getattr(self, key) > 0, f"loss.{key}", "must be > 0")
        _check(self.warmup_teacher_temp_epochs >= 0, "loss.warmup_teacher_temp_epochs", "must be >= 0")
        _check(0 <= self.center_momentum < 1, "loss.center_momentum", "must be in [0, 1)")
        for key in ("cls_weight", "patch_weight"):
            _check(getattr(self, key) >= 0, f"loss.{key}", "must be >= 0")
        for key in ("cls_centering", "patch_centering"):
            _check(getattr(self, key) in CENTERINGS, f"loss.{key}", f"must be one of {', '.join(CENTERINGS)}")
        _check(self.koleo_weight >= 0, "loss.koleo_weight", "must be >= 0")
        _check(self.koleo_schedule in ("constant", "cosine"), "loss.koleo_schedule", "must be constant or cosine")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up + cosine schedules; ``lr`` is per 256 images (linear scaling rule)."""

    epochs: float = 100
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    clip_grad: float = 3.0  # 0 disables clipping
    freeze_last_layer_epochs: float = 1
    betas: tuple[float, float] = (0.9, 0.999)
    # Continuing pre-training from a backbone (docs/init-from.md): for this many epochs the
    # student backbone takes no step (no gradient, no weight decay, no AdamW state) and the
    # teacher backbone no EMA, while the heads learn; its learning rate then warms up again over
    # optim.warmup_epochs. -1 = auto: ibot.train.backbone_freeze.AUTO_FREEZE_STEPS steps when
    # model.init_from gives fresh heads, else 0. Off by default: measured from a CIFAR-10 backbone
    # on a shifted domain, the freeze ended every run below fresh heads (docs/init-from.md).
    freeze_backbone_epochs: float = 0
    backbone_lr_scale: float = 1.0  # the backbone's lr is lr times this for the whole run (heads: lr)

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "optim.epochs", "must be > 0")
        _check(self.lr > 0, "optim.lr", "must be > 0")
        # The cosine runs from lr down to min_lr: a floor above the peak would make it climb.
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, optim.lr]")
        for key in ("warmup_epochs", "freeze_last_layer_epochs", "weight_decay", "weight_decay_end"):
            _check(getattr(self, key) >= 0, f"optim.{key}", "must be >= 0")
        for key in ("momentum_teacher", "momentum_teacher_end"):
            _check(0 <= getattr(self, key) <= 1, f"optim.{key}", "must be in [0, 1]")
        _check(self.clip_grad >= 0, "optim.clip_grad", "must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", "each must be in [0, 1)")
        _check(
            self.freeze_backbone_epochs >= 0 or self.freeze_backbone_epochs == -1,
            "optim.freeze_backbone_epochs",
            "must be >= 0, or -1 (auto: frozen a while when model.init_from gives fresh heads)",
        )
        _check(self.backbone_lr_scale > 0, "optim.backbone_lr_scale", "must be > 0 (to freeze: freeze_backbone_epochs)")


@dataclass(frozen=True)
class TrainConfig:
    """Run control: output, seed, precision, logging and checkpoint cadence."""

    output_dir: str = "runs/ibot"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # bf16 where the hardware has it, else fp16+scaler (CUDA) or fp32
    attention: str = "auto"  # "sdpa", "explicit" or "auto" (per device and dtype)
    # The blocks' residual stream in fp32 or in the autocast dtype ("amp"); "auto" = amp under
    # CPU bf16, where it saves the casts around every matmul and half the stored activations.
    residual_precision: str = "auto"
    threads: int = 0  # CPU intra-op threads; 0 keeps torch's default
    compile: bool = False  # torch.compile the backbones (one graph per crop resolution)
    activation_checkpointing: bool = False  # recompute student blocks in backward: less memory, ~1/3 more compute
    # Under torchrun: "ddp" replicates the model on every rank; "fsdp" shards parameters,
    # gradients and AdamW state over the ranks (FSDP2 ``fully_shard``; ViT-L and larger).
    parallel: str = "ddp"
    log_every: int = 10  # steps between metric lines (host syncs happen only then)
    checkpoint_every: int = 500  # steps; a checkpoint is always written at the end
    max_minutes: float = 0  # stop (with a checkpoint) after this wall time; 0 = no limit
    # Schedules (LR, weight decay, teacher momentum) span this much training time instead of
    # optim.epochs, and the run ends when it is spent (``--budget 60m``); 0 = use optim.epochs.
    budget_minutes: float = 0
    max_steps: int = 0  # stop (with a checkpoint) at this step, schedules unchanged; 0 = no limit
    keep_checkpoints: int = 2  # step checkpoints kept in output_dir (checkpoint.pt links the newest)
    # Non-finite losses whose update is skipped (each logged) before the run stops; > 0 checks the
    # loss at every step (a host sync), 0 only at log and checkpoint steps.
    skip_nonfinite_steps: int = 0
    # What a resume may change (``RESUME_CHANGES``); any other change is refused with one line.
    resume_allow_changes: tuple[str, ...] = ()
    # Experiment trackers (docs/tracking.md); metrics.jsonl is always written. mlflow_uri "" =
    # sqlite:///RUN/mlflow.db in the run folder; wandb_mode "offline" needs no account or network.
    loggers: tuple[str, ...] = ("tensorboard",)
    mlflow_uri: str = ""
    mlflow_experiment: str = "ibot"
    wandb_project: str = "ibot"
    wandb_mode: str = "offline"

    def __post_init__(self) -> None:
        _check(self.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}")
        _check(self.attention in ATTENTIONS, "train.attention", f"must be one of {ATTENTIONS}")
        _check(
            self.residual_precision in RESIDUAL_PRECISIONS,
            "train.residual_precision",
            f"must be one of {RESIDUAL_PRECISIONS}",
        )
        _check(self.parallel in ("ddp", "fsdp"), "train.parallel", "must be 'ddp' or 'fsdp'")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.threads >= 0, "train.threads", "must be >= 0 (0 = torch's default)")
        for key in ("budget_minutes", "max_minutes", "max_steps"):
            _check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0 (0 = no limit)")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(self.skip_nonfinite_steps >= 0, "train.skip_nonfinite_steps", "must be >= 0")
        unknown = sorted(set(self.resume_allow_changes) - set(RESUME_CHANGES))
        _check(not unknown, "train.resume_allow_changes", f"unknown {unknown}; allowed: {list(RESUME_CHANGES)}")
        loggers = sorted(set(self.loggers) - set(LOGGERS))
        _check(not loggers, "train.loggers", f"unknown {loggers}; allowed: {list(LOGGERS)}")
        _check(self.wandb_mode in ("offline", "online"), "train.wandb_mode", "must be 'offline' or 'online'")
        for key in ("mlflow_experiment", "wandb_project"):
            _check(bool(getattr(self, key).strip()), f"train.{key}", "must not be empty")


@dataclass(frozen=True)
class EvalConfig:
    """Frozen-feature evaluation defaults (k-NN protocol of DINO)."""

    train_path: str = ""  # labelled image folders for ``ibot eval`` (command-line paths win)
    test_path: str = ""
    # Test classes map to the train folder's by name; one the train folder lacks is an error,
    # or with "skip" its images are left out and counted as skipped.
    unknown_test_classes: str = "error"
    crop_ratio: float = 0.875  # resize to size / crop_ratio, centre-crop size (1.0: plain resize)
    # Side of the evaluation images; 0 = data.global_crop_size. A model pre-trained on smaller
    # global crops than the images it will see (more steps per hour) is evaluated at full size.
    image_size: int = 0
    knn_k: tuple[int, ...] = (10, 20, 100, 200)
    knn_temperature: float = 0.07
    batch_size: int = 256
    # Retrieval (``ibot retrieve``, ``ibot eval retrieval``): exact inner-product search up to this
    # many database images, an IVF index (4 sqrt(N) cells, nprobe visited per query) above.
    retrieval_flat_max: int = 100_000
    retrieval_nprobe: int = 32
    # k-NN monitor during pre-training: a fixed subset of train_path / test_path, scored on the
    # teacher every so many minutes of training (monitor time is not counted as training time).
    monitor_every_minutes: float = 0.0  # 0 disables
    monitor_every_steps: int = 0  # or every so many steps (a curve comparable across machines); 0 disables
    monitor_train_images: int = 5000
    monitor_test_images: int = 1000
    monitor_k: int = 20
    # Probes on frozen tokens (``ibot eval probe``): every probe at every lr, picked on a
    # validation split of the training folder (see ibot.eval.probes for the names). A pick on
    # an edge of the grid extends it by a half-decade step, up to probe_max_extensions times.
    probes: tuple[str, ...] = ("cls", "cls4", "cls+avg", "cls4+avg", "mean-pool", "attention-pool", "attentive")
    probe_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    probe_max_extensions: int = 3
    probe_epochs: int = 10
    probe_batch_size: int = 256
    probe_val_fraction: float = 0.1
    # Dense probe (``ibot eval dense``): grid x grid mosaics of the train / test folders, one
    # class per tile, trained with the probe_* settings above.
    dense_grid: int = 2
    dense_train_mosaics: int = 5000
    dense_test_mosaics: int = 1000
    # Robustness (``ibot eval robustness``): this probe, trained on clean features, scored on this
    # many test images under each CIFAR-10-C corruption and severity (15 x 5 sets).
    robustness_probe: str = "cls"
    robustness_images: int = 1000
    # Unsupervised classification (``ibot eval cluster``): k-means (k = classes) on the last
    # block's L2-normalised [cls] of one folder ("test" or "train"), best inertia of the restarts.
    cluster_split: str = "test"
    cluster_restarts: int = 5
    # Low-shot (``ibot eval lowshot``): k-NN and logistic regression on n labelled images per
    # class and on fractions of the training labels, each drawn once per seed of lowshot_draws.
    lowshot_shots: tuple[int, ...] = (1, 5, 10)
    lowshot_fractions: tuple[float, ...] = (0.01, 0.1)
    lowshot_draws: tuple[int, ...] = (0, 1, 2, 3, 4)
    lowshot_knn_k: int = 20
    lowshot_logreg_c: float = 1.0

    def __post_init__(self) -> None:
        self._check_cluster_lowshot()
        _check(self.unknown_test_classes in ("error", "skip"), "eval.unknown_test_classes", "must be error or skip")
        _check(self.monitor_every_minutes >= 0, "eval.monitor_every_minutes", "must be >= 0")
        _check(self.monitor_every_steps >= 0, "eval.monitor_every_steps", "must be >= 0")
        _check(
            not (self.monitor_every_minutes and self.monitor_every_steps),
            "eval.monitor_every_steps",
            "set it or eval.monitor_every_minutes, not both",
        )
        for key in ("monitor_train_images", "monitor_test_images", "monitor_k"):
            _check(getattr(self, key) >= 1, f"eval.{key}", "must be >= 1")
        _check(0 < self.crop_ratio <= 1, "eval.crop_ratio", "must be in (0, 1]")
        _check(self.image_size >= 0, "eval.image_size", "must be >= 0 (0 = data.global_crop_size)")
        _check(len(self.knn_k) > 0, "eval.knn_k", "needs at least one k")
        _check(all(k >= 1 for k in self.knn_k), "eval.knn_k", "every k must be >= 1")
        _check(self.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
        _check(self.retrieval_flat_max >= 0, "eval.retrieval_flat_max", "must be >= 0")
        _check(self.retrieval_nprobe >= 1, "eval.retrieval_nprobe", "must be >= 1")
        _check(len(self.probes) > 0, "eval.probes", "needs at least one probe")
        _check(len(self.probe_lrs) > 0, "eval.probe_lrs", "needs at least one lr")
        _check(all(lr > 0 for lr in self.probe_lrs), "eval.probe_lrs", "every lr must be > 0")
        for key in ("batch_size", "probe_batch_size", "probe_epochs"):
            _check(getattr(self, key) >= 1, f"eval.{key}", "must be >= 1")
        _check(self.probe_max_extensions >= 0, "eval.probe_max_extensions", "must be >= 0")
        _check(0 < self.probe_val_fraction < 1, "eval.probe_val_fraction", "must be in (0, 1)")
        for key in ("dense_grid", "dense_train_mosaics", "dense_test_mosaics", "robustness_images"):
            _check(getattr(self, key) >= 1, f"eval.{key}", "must be >= 1")

    @property
    def monitoring(self) -> bool:
        """Whether the k-NN monitor runs during pre-training (every so many minutes or steps)."""
        return self.monitor_every_minutes > 0 or self.monitor_every_steps > 0

    def _check_cluster_lowshot(self) -> None:
        _check(self.cluster_split in ("test", "train"), "eval.cluster_split", "must be test or train")
        for key in ("cluster_restarts", "lowshot_knn_k"):
            _check(getattr(self, key) >= 1, f"eval.{key}", "must be >= 1")
        _check(len(self.lowshot_shots) + len(self.lowshot_fractions) > 0, "eval.lowshot_shots", "no setting left")
        _check(all(n >= 1 for n in self.lowshot_shots), "eval.lowshot_shots", "every count must be >= 1")
        _check(all(0 < f < 1 for f in self.lowshot_fractions), "eval.lowshot_fractions", "must be in (0, 1)")
        _check(len(self.lowshot_draws) > 0, "eval.lowshot_draws", "needs at least one seed")
        _check(len(set(self.lowshot_draws)) == len(self.lowshot_draws), "eval.lowshot_draws", "seeds must differ")
        _check(self.lowshot_logreg_c > 0, "eval.lowshot_logreg_c", "must be > 0")


@dataclass(frozen=True)
class FinetuneConfig:
    """Full fine-tuning (``ibot eval finetune``): BEiT/iBOT recipe with layer-wise lr decay."""

    epochs: float = 5
    lr: float = 5e-4  # per 256 images, for the head; block i gets layer_decay ** (depth - i) of it
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    batch_size: int = 128
    warmup_epochs: float = 0.5
    num_workers: int = 2

    def __post_init__(self) -> None:
        for key in ("epochs", "lr"):
            _check(getattr(self, key) > 0, f"finetune.{key}", "must be > 0")
        _check(0 < self.layer_decay <= 1, "finetune.layer_decay", "must be in (0, 1]")
        _check(0 <= self.drop_path < 1, "finetune.drop_path", "must be in [0, 1)")
        _check(0 <= self.label_smoothing < 1, "finetune.label_smoothing", "must be in [0, 1)")
        for key in ("weight_decay", "mixup", "cutmix", "warmup_epochs", "num_workers"):
            _check(getattr(self, key) >= 0, f"finetune.{key}", "must be >= 0")
        _check(self.batch_size >= 2, "finetune.batch_size", "must be >= 2 (mixup mixes pairs)")


@dataclass(frozen=True)
class DistillConfig:
    """``ibot distill``: a frozen teacher read from a file teaches the ``model`` section's student."""

    # The teacher: any file model.init_from reads (a run folder, checkpoint.pt, teacher.safetensors,
    # an official iBOT/DINO checkpoint, a timm/DINO/DINOv2 ViT); "" = no distillation (ibot pretrain).
    teacher: str = ""
    # prototypes: DINOv2's recipe over the teacher's own projection heads (the file must hold them);
    # regression: the teacher's normalised [cls] and patch tokens through a learned projection;
    # ema_head: the prototype losses through a head the teacher learns as the EMA of the student's;
    # auto: prototypes when the teacher file's heads load, else regression (docs/distill.md).
    objective: str = "auto"
    regression_loss: str = "cosine"  # cosine (1 - cos) or smooth_l1 (on the normalised vectors)
    # vit: the ViT of the model section; timm:NAME: timm's CNN NAME (resnet18, convnext_atto, ...),
    # never pretrained, its feature map on the grid of model.patch_size (docs/distill.md); also
    # the network ibot pretrain trains from scratch when there is no distill.teacher.
    student: str = "vit"

    def __post_init__(self) -> None:
        _check(
            self.student == "vit" or (self.student.startswith("timm:") and len(self.student) > 5),
            "distill.student",
            f"{self.student!r}: must be vit or timm:NAME (a timm CNN, e.g. timm:resnet18)",
        )
        _check(
            self.objective in DISTILL_OBJECTIVES, "distill.objective", f"must be one of {', '.join(DISTILL_OBJECTIVES)}"
        )
        _check(
            self.regression_loss in REGRESSION_LOSSES,
            "distill.regression_loss",
            f"must be one of {', '.join(REGRESSION_LOSSES)}",
        )


@dataclass(frozen=True)
class Config:
    """The whole run: one section per stage of the data flow."""

    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    mim: MimConfig = field(default_factory=MimConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        """Checks that span sections (each section checks its own values)."""
        # A crop that is no multiple of the patch size loses its border pixels to the patch
        # embedding's stride without a word; local crops count only when there are any.
        patch = self.model.patch_size
        sizes = {"data.global_crop_size": self.data.global_crop_size, "eval.image_size": self.eval.image_size}
        if self.data.num_local_crops:
            sizes["data.local_crop_size"] = self.data.local_crop_size
        for key, size in sizes.items():
            _check(size % patch == 0, key, f"{size} is no multiple of model.patch_size ({patch})")
        if self.distill.student != "vit":  # a timm CNN, distilled or pre-trained from scratch
            _check(not self.model.init_from, "model.init_from", "starts ViT students only, not a timm CNN")
            frozen = self.mim.target == "frozen" and not self.distill.teacher
            cnn_targets = "frozen reads a ViT tokenizer; a timm CNN student takes online or codebook"
            _check(not frozen, "mim.target", cnn_targets)
        # KoLeo pushes each [cls] token from its nearest neighbour in the process's batch:
        # with one image per process there is no neighbour.
        _check(
            self.loss.koleo_weight == 0 or self.data.batch_size >= 2,
            "loss.koleo_weight",
            "KoLeo needs data.batch_size >= 2 (a nearest neighbour per process)",
        )

    def to_dict(self) -> dict[str, Any]:
        plain = _to_plain(dataclasses.asdict(self))
        for key in AUTO_KEYS:  # written as the user wrote it, and read back the same
            section, name = key.split(".")
            if not plain[section][name]:
                plain[section][name] = "auto"
        return plain

    @property
    def eval_image_size(self) -> int:
        """Side of the images every evaluation (k-NN monitor included) feeds the backbone."""
        return self.eval.image_size or self.data.global_crop_size


@dataclass(frozen=True)
class RunPlan:
    """Values derived from the config and the run's world size; logged, never written back.

    With ``train.budget_minutes`` the loop re-estimates ``total_steps`` from the pace so far.
    """

    global_batch_size: int
    steps_per_epoch: int
    total_steps: int
    lr: float  # peak learning rate after the linear scaling rule
    dataset_size: int = 0  # files listed in data.path (a checkpoint before this field: 0)
    world_size: int = 1
    # optim.freeze_backbone_epochs in steps, auto resolved at the start (ibot.train.backbone_freeze)
    # and kept in the checkpoint, so that a resume freezes exactly as the run began.
    freeze_backbone_steps: int = 0

    @staticmethod
    def derive(cfg: Config, dataset_size: int, world_size: int = 1) -> RunPlan:
        global_batch = cfg.data.batch_size * world_size
        steps_per_epoch = max(1, dataset_size // global_batch)
        return RunPlan(
            global_batch_size=global_batch,
            steps_per_epoch=steps_per_epoch,
            total_steps=max(1, math.ceil(cfg.optim.epochs * steps_per_epoch)),
            lr=cfg.optim.lr * global_batch / 256,
            dataset_size=dataset_size,
            world_size=world_size,
        )


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ``ConfigError`` naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        args = typing.get_args(annotation)
        if key in AUTO_KEYS and isinstance(value, str) and value.lower() == "auto":
            return ()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}") from None
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a (partial) nested dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            valid = [f"{prefix}{n}" for n in fields]
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {key}{hint}; valid keys: {', '.join(valid)}")
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            kwargs[name] = _build(annotation, value, f"{key}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, annotation, key)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def _merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in delta.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line ``ConfigError`` naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8 text)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or type(exc).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _overrides_to_dict(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for text in overrides:
        keys, value = _parse_override(text)
        delta: dict[str, Any] = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            delta = {k: delta}
        values = _merge(values, delta)
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file's deltas, then ``dotted.key=value`` overrides.

    An error is prefixed with what caused it: the file, or the override without which the
    config loads (``override data.batch_sise=4: unknown config key ...``).
    """
    values: dict[str, Any] = read_yaml(path) if path is not None else {}
    delta = _overrides_to_dict(overrides)
    try:
        return _build_checked(_merge(values, delta))
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(_blame(path, values, list(overrides), exc)) from None


def _build_checked(values: dict[str, Any]) -> Config:
    cfg = _build(Config, values, "")
    _check_paths(cfg)
    return cfg


def _loads(values: dict[str, Any]) -> ConfigError | None:
    """The error building ``values`` raises, None when they make a valid config."""
    try:
        _build_checked(values)
    except ConfigError as exc:
        return exc
    return None


def _blame(path: str | Path, values: dict[str, Any], overrides: list[str], exc: ConfigError) -> str:
    """``exc`` of file ``path`` (``values``) plus ``overrides``, prefixed with its cause: the one
    override that the config loads without; else the file with its own error when it fails
    alone; else the first override that makes it fail, with that failure."""
    for i, text in enumerate(overrides):
        if _loads(_merge(values, _overrides_to_dict(overrides[:i] + overrides[i + 1 :]))) is None:
            return f"override {text}: {exc}"
    alone = _loads(values)
    if alone is not None:
        return f"{path}: {alone}"
    for i, text in enumerate(overrides):
        first = _loads(_merge(values, _overrides_to_dict(overrides[: i + 1])))
        if first is not None:
            return f"override {text}: {first}"
    return f"{path}: {exc}"  # unreachable: the file and all overrides failed together


def _check_paths(cfg: Config) -> None:
    """Paths the user names must exist. Checked here, not in the dataclasses: configs rebuilt from
    a checkpoint or a backbone file (``config_from_dict``) must load after such a file moved."""
    init_from = cfg.model.init_from
    _check(
        not init_from or Path(init_from).expanduser().exists(),
        "model.init_from",
        f"{init_from}: no such file or folder",
    )
    teacher = cfg.distill.teacher
    _check(not teacher or Path(teacher).expanduser().exists(), "distill.teacher", f"{teacher}: no such file or folder")


def config_from_dict(values: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Strictly rebuild a ``Config`` from ``Config.to_dict()`` output (e.g. a checkpoint's), then overrides."""
    return _build(Config, _merge(values, _overrides_to_dict(overrides)), "")
