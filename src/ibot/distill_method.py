"""``ibot distill`` as one module: a frozen teacher read from a file teaches a smaller student.

Same interface as ``ibot.method.IBOT`` (the training loop steps either): ``student`` holds what
trains, ``teacher`` the frozen teacher (eval mode, no gradients, no EMA, left out of the state
dict: it is re-read from its file, whose size and sha256 a checkpoint records). The teacher sees
the unmasked global crops once per step under ``no_grad``; the student sees the masked global
crops and the local crops, as in pre-training. Objectives (``distill.objective``, docs/distill.md):

- ``prototypes`` (the teacher file carries its projection heads): DINOv2's distillation. The
  student's head (the teacher's shapes, the student's input width) maps its [cls] of every view
  and its masked patch tokens onto the teacher's prototypes; targets are the teacher's centred,
  sharpened distributions over the global crops' [cls] (``DINOClsLoss``) and the same patches
  (``IBOTPatchLoss``); plus KoLeo on the student's global [cls].
- ``ema_head`` (any teacher; its file's heads are not used): the same prototype losses through a
  head the teacher learns with the student, as in pre-training: the student's tokens go through
  a linear projection to the teacher's width and a fresh head (``model.*``'s shapes, K =
  ``model.out_dim``); the teacher's head is the EMA of the student's (``optim.momentum_teacher``)
  on its frozen backbone's tokens; it is saved with the student.
- ``regression`` (a backbone alone): the student's [cls] and patch tokens through learned linear
  projections (student width -> teacher width) match the teacher's L2-normalised tokens (1 - cos,
  or smooth-L1 on the normalised vectors). [cls]: each global crop against the teacher's same
  crop, each local crop against the mean of the teacher's global [cls] of its image. Patches:
  every patch token of the global crops (masked ones predict the teacher's token at the hidden
  position, as iBOT's student does; the others are plain feature distillation).

A teacher whose patch grid differs from the student's (a /16 teacher, a /8 student) has its
patch tokens resized to the student's grid (``resize_patches``) before its head or the regression.
The student is any backbone returning ``Tokens`` (cls, patches) with ``embed_dim``: the
``MaskedViT`` of ``model.*``, or (``distill.student=timm:NAME``) a timm CNN
(``ibot.models.cnn_student``) whose feature map lies on the teacher's patch grid; a CNN student
is never masked (every patch counts as a masked one for the prototypes objective).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ibot.config import Config
from ibot.data.collate import Batch
from ibot.errors import ConfigError
from ibot.losses import DINOClsLoss, IBOTPatchLoss, KoLeoLoss, build_centering
from ibot.losses.patch_targets import gather_patches
from ibot.method import LossOutput, StudentTeacher, student_param_groups
from ibot.models.cnn_student import check_crops, check_name, cnn_name, resize_grid
from ibot.models.fit import load_fitted, run_backbone
from ibot.models.heads import ProjectionHead
from ibot.models.init_weights import InitWeights
from ibot.models.teacher_file import TeacherFile, describe_backbone, head_like, read_teacher
from ibot.models.vit import Tokens
from ibot.storage import sub_state_dict

_EXTRA = "_extra_state"


def resize_patches(patches: torch.Tensor, side: int) -> torch.Tensor:
    """(B, n*n, D) patch tokens -> (B, side*side, D) by the CNN student's rule (``resize_grid``: average
    pooling onto a coarser grid, bilinear onto a finer one; identity when n == side)."""
    b, n, d = patches.shape
    old = round(n**0.5)
    if old == side:
        return patches
    grid = resize_grid(patches.transpose(1, 2).reshape(b, d, old, old).float(), (side, side))
    return grid.to(patches.dtype).flatten(2).transpose(1, 2)


def regression_loss(kind: str, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - cos (``cosine``) or smooth-L1 summed over the dimension (``smooth_l1``)
    between the normalised ``student`` (X, D) and the normalised ``target`` (X, D)."""
    s = F.normalize(student.float(), dim=-1)
    if kind == "cosine":
        return (1 - (s * target).sum(-1)).mean()
    return F.smooth_l1_loss(s, target, reduction="none").sum(-1).mean()


def choose_objective(wanted: str, teacher: TeacherFile) -> str:
    """``distill.objective`` resolved: auto = prototypes when the teacher's heads loaded."""
    if wanted == "prototypes" and not teacher.heads:
        raise ConfigError(
            f"distill.objective=prototypes: {teacher.path} has no projection heads that load ({teacher.no_heads}); "
            "use distill.objective=regression or ema_head (or auto)"
        )
    if wanted == "auto":
        return "prototypes" if teacher.heads else "regression"
    return wanted


class Distill(StudentTeacher):
    """A student taught by a frozen teacher from a file; the loop's interface of ``IBOT``."""

    evaluated = "student"  # the run's model is the student (RUN/teacher.safetensors, the k-NN monitor)

    def __init__(self, cfg: Config, teacher: TeacherFile, objective: str) -> None:
        super().__init__()
        student = run_backbone(cfg)
        width, teacher_width = student.embed_dim, teacher.backbone.embed_dim
        self.student_kind = cfg.distill.student
        self.cnn = bool(cnn_name(self.student_kind))
        if self.cnn:  # its width is no measure of its cost: the projections map any width
            _check_cnn(student, cfg, teacher)
        elif width > teacher_width:
            raise ConfigError(
                f"model.arch: the student ({describe_backbone(student)}) is wider than the teacher {teacher.path} "
                f"({teacher.describe()}): distillation is into a smaller model"
            )
        self.objective = choose_objective(objective, teacher)
        self.teacher_file = teacher
        modules: dict[str, nn.Module] = {"backbone": student}
        teacher_heads: dict[str, nn.Module] = dict(teacher.heads)
        if self.objective == "prototypes":
            for name, head in teacher.heads.items():
                modules[name] = head_like(head.state_dict(), width, cfg.model.norm_last_layer)
        elif self.objective == "ema_head":
            modules["proj"] = nn.Linear(width, teacher_width)
            modules["head"] = ProjectionHead.from_config(cfg.model, teacher_width)
            teacher_heads = {"head": copy.deepcopy(modules["head"]).requires_grad_(False)}
        else:
            modules["cls_proj"] = nn.Linear(width, teacher_width)
            modules["patch_proj"] = nn.Linear(width, teacher_width)
        self.student = nn.ModuleDict(modules)
        self.teacher = nn.ModuleDict({"backbone": teacher.backbone, **teacher_heads})
        if self.objective != "regression":
            k = next(m for name, m in self.teacher.items() if name != "backbone").last_layer.out_features
            self.cls_center = build_centering(cfg.loss.cls_centering, k, cfg.loss.center_momentum)
            self.patch_center = build_centering(cfg.loss.patch_centering, k, cfg.loss.center_momentum)
        self.pair_ema_parameters()
        self.regression = cfg.distill.regression_loss
        self.cls_loss = DINOClsLoss(cfg.loss.student_temp)
        self.patch_loss = IBOTPatchLoss(cfg.loss.student_temp)
        self.cls_weight, self.patch_weight = cfg.loss.cls_weight, cfg.loss.patch_weight
        self.koleo_weight = cfg.loss.koleo_weight
        self.koleo_loss = KoLeoLoss() if cfg.loss.koleo_weight > 0 else None
        self.grid = cfg.data.global_crop_size // cfg.model.patch_size  # the student's patch grid side
        self._register_state_dict_hook(_drop_teacher)
        self.train()

    @staticmethod
    def from_config(cfg: Config) -> Distill:
        """The teacher of ``distill.teacher`` read and checked (every refusal here: before the run writes)."""
        if cfg.train.parallel == "fsdp":
            raise ConfigError("train.parallel=fsdp is not supported by ibot distill yet")
        if name := cnn_name(cfg.distill.student):
            check_name(name)  # before reading a teacher file of maybe gigabytes
        teacher = read_teacher(cfg.distill.teacher, cfg.data.global_crop_size, cfg.data.channels)
        return Distill(cfg, teacher, cfg.distill.objective)

    def start_line(self) -> str:
        t = self.teacher_file
        notes = "".join(f"; {n}" for n in t.notes)
        return (
            f"distill: teacher {t.path} ({t.layout}): {t.describe()}; objective {self.objective}; "
            f"student {describe_backbone(self.student['backbone'])}{notes}"
        )

    # --- the loop's interface (``IBOT``'s) ---------------------------------------------------------

    def start_from(self, init: InitWeights) -> None:
        """``model.init_from``'s backbone into the student (heads and projections start fresh): the
        file's teacher branch, the model of the run that wrote it (a backbone file: its only one)."""
        backbone = sub_state_dict(init.teacher, "backbone.")
        where = "model.init_from does not fit the student"
        load_fitted(self.student["backbone"], backbone, init.source, where, lambda key: key == "mask_token")

    def pair_ema_parameters(self) -> None:
        """The head pairs of ``ema_head``; the teacher's backbone (and a file's heads) stay fixed."""
        ema = self.objective == "ema_head"
        self._student_head_params = list(self.student["head"].parameters()) if ema else []
        self._teacher_head_params = list(self.teacher["head"].parameters()) if ema else []

    @torch.no_grad()
    def update_teacher(self, momentum: float, backbone: bool = True) -> None:
        """``ema_head``: teacher head <- momentum * teacher head + (1 - momentum) * student head."""
        if self._teacher_head_params:
            torch._foreach_lerp_(self._teacher_head_params, self._student_head_params, 1.0 - momentum)

    def param_groups(self, split_backbone: bool = True) -> list[dict]:
        return student_param_groups(self.student, split_backbone)

    # --- checkpoints: the student and its heads; the teacher's file is named, not saved ------------

    def get_extra_state(self) -> dict[str, Any]:
        fingerprint = dict(self.teacher_file.fingerprint)
        return {"teacher": fingerprint, "objective": self.objective, "student": self.student_kind}

    def set_extra_state(self, state: Any) -> None:
        """Checked in ``load_state_dict`` (before any weight is loaded)."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """A checkpoint of this distillation: refused in one line when the teacher file changed
        since it was written or the objective differs; the frozen teacher stays as read."""
        saved = state_dict.get(_EXTRA) or {}
        if saved.get("student", "vit") != self.student_kind:
            raise ConfigError(
                f"distill.student: the checkpoint's student is {saved.get('student', 'vit')}, this run's "
                f"{self.student_kind}; resume with the same student (or start a new output_dir)"
            )
        if saved.get("objective") != self.objective:
            raise ConfigError(
                f"distill.objective: the checkpoint was trained with {saved.get('objective')}, this run "
                f"resolves to {self.objective}; resume with the same objective (or start a new output_dir)"
            )
        if saved.get("teacher") != self.teacher_file.fingerprint:
            raise ConfigError(
                f"distill.teacher: {self.teacher_file.path} is not the file the checkpoint was distilled from "
                "(its size or sha256 changed); resume with that teacher (or start a new output_dir)"
            )
        frozen = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items() if _frozen(self, f"teacher.{k}")}
        return super().load_state_dict({**state_dict, **frozen}, strict, assign)

    # --- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_tokens(self, batch: Batch) -> Tokens:
        """The teacher's [cls] (G*B, Dt) and patch tokens on the student's grid (G*B, N, Dt)."""
        tokens = self.teacher["backbone"](batch.global_crops)
        return Tokens(tokens.cls, resize_patches(tokens.patches, self.grid))

    def student_tokens(self, batch: Batch) -> tuple[Tokens, torch.Tensor]:
        """The student's global tokens (masked crops) and the [cls] of every view (V*B, D)."""
        backbone = self.student["backbone"]
        global_tokens = backbone(batch.global_crops, batch.mask)
        cls = global_tokens.cls
        if batch.local_crops.shape[0]:
            cls = torch.cat([cls, backbone(batch.local_crops).cls])
        return global_tokens, cls

    def forward(
        self, batch: Batch, teacher_temp: float, monitors: bool = False, koleo_weight: float | None = None
    ) -> LossOutput:
        """The objective's losses for one batch (+ KoLeo); ``monitors``: also the timings."""
        clock = _Clock(batch.global_crops.device, monitors)
        if self.cnn:  # no masking: the patch objective runs on every token
            batch = replace(batch, mask=torch.ones_like(batch.mask), mask_indices=None)
        teacher = self.teacher_tokens(batch)
        teacher_ms = clock.lap()
        student, all_cls = self.student_tokens(batch)
        student_ms = clock.lap()
        if self.objective != "regression":
            total, parts, watched = self._prototypes(batch, teacher, student, all_cls, teacher_temp)
        else:
            total, parts, watched = self._regression(batch, teacher, student, all_cls)
        total = self._add_koleo(total, parts, student.cls, batch.batch_size, koleo_weight)
        if monitors:
            watched["distill_teacher_ms"] = torch.tensor(teacher_ms, device=total.device)
            watched["distill_student_ms"] = torch.tensor(student_ms, device=total.device)  # forward alone
        return LossOutput(total, parts, watched)

    def _regression(
        self, batch: Batch, teacher: Tokens, student: Tokens, all_cls: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        b = batch.batch_size
        target_cls = F.normalize(teacher.cls.float(), dim=-1)  # (G*B, Dt)
        views = all_cls.shape[0] // b
        image_cls = F.normalize(target_cls.view(-1, b, target_cls.shape[-1]).mean(0), dim=-1)  # (B, Dt)
        targets = torch.cat([target_cls, image_cls.repeat(views - target_cls.shape[0] // b, 1)])  # (V*B, Dt)
        cls_pred = self.student["cls_proj"](all_cls)
        patch_pred = self.student["patch_proj"](student.patches).flatten(0, 1)  # (G*B*N, Dt)
        target_patches = F.normalize(teacher.patches.float(), dim=-1).flatten(0, 1)
        cls_loss = regression_loss(self.regression, cls_pred, targets)
        patch_loss = regression_loss(self.regression, patch_pred, target_patches)
        total = self.cls_weight * cls_loss + self.patch_weight * patch_loss
        parts = {"cls": cls_loss.detach(), "patch": patch_loss.detach()}
        n = target_cls.shape[0]
        watched = {
            "distill_cls_cos": _mean_cos(cls_pred[:n], target_cls),
            "distill_patch_cos": _mean_cos(patch_pred, target_patches),
        }
        return total, parts, watched

    def _prototypes(
        self, batch: Batch, teacher: Tokens, student: Tokens, all_cls: torch.Tensor, teacher_temp: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        b, masked = batch.batch_size, batch.masked_indices()
        with torch.no_grad():
            t = self._heads(self.teacher, teacher.cls, gather_patches(teacher.patches, masked))
        s_cls_in, s_patch_in = all_cls, gather_patches(student.patches, masked)
        if "proj" in self.student:  # ema_head: onto the teacher's width, the input of the EMA'd head
            s_cls_in, s_patch_in = self.student["proj"](s_cls_in), self.student["proj"](s_patch_in)
        s_out = self._heads(self.student, s_cls_in, s_patch_in)
        t_cls, t_patch, s_cls, s_patch = t.cls_logits, t.patch_logits, s_out.cls_logits, s_out.patch_logits
        k = t_cls.shape[-1]
        cls_probs = self.cls_center.probs(t_cls, teacher_temp)  # (G*B, K)
        patch_probs = self.patch_center.probs(t_patch, teacher_temp)  # (M, K)
        cls_loss = self.cls_loss(s_cls.view(-1, b, k), cls_probs.view(-1, b, k))
        patch_loss = self.patch_loss(s_patch, patch_probs, batch.mask, masked)
        self.cls_center.update(t_cls)
        self.patch_center.update(t_patch)
        total = self.cls_weight * cls_loss + self.patch_weight * patch_loss
        parts = {"cls": cls_loss.detach(), "patch": patch_loss.detach()}
        temp = self.cls_loss.student_temp
        n = cls_probs.shape[0]
        watched = {  # of the distributions: the student's own crop against the teacher's target
            "distill_cls_cos": _mean_cos(torch.softmax(s_cls[:n].float() / temp, -1), cls_probs),
            "distill_patch_cos": _mean_cos(torch.softmax(s_patch.float() / temp, -1), patch_probs),
        }
        return total, parts, watched


@torch.no_grad()
def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[0] == 0:
        return a.new_zeros((), dtype=torch.float32)
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean()


def _check_cnn(student: nn.Module, cfg: Config, teacher: TeacherFile) -> None:
    """A CNN student's tokens lie on the teacher's patch grid (``model.patch_size``) and it must run
    on the smallest crop: one line each, before the run writes anything."""
    if cfg.model.patch_size != teacher.model.patch_size:
        raise ConfigError(
            f"model.patch_size={cfg.model.patch_size}: a CNN student's feature map is resized to the teacher's "
            f"patch grid; set model.patch_size={teacher.model.patch_size} (the patch size of {teacher.path})"
        )
    check_crops(student, cfg)


def _frozen(module: Distill, key: str) -> bool:
    """Whether ``key`` (``teacher.…``) is of the frozen teacher read from its file, not of the head
    ``ema_head`` trains."""
    return key.startswith("teacher.") and not (module.objective == "ema_head" and key.startswith("teacher.head."))


def _drop_teacher(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """The frozen teacher is not saved: its file is (``get_extra_state`` records which)."""
    for key in [k for k in state_dict if k.startswith(prefix) and _frozen(module, k.removeprefix(prefix))]:
        del state_dict[key]


class _Clock:
    """Milliseconds between laps, measured on log steps only (on CUDA each lap synchronises)."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled, self.cuda = enabled, device.type == "cuda"
        self.last = self._now()

    def _now(self) -> float:
        if self.enabled and self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() if self.enabled else 0.0

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = 1000 * (now - self.last), now
        return elapsed
