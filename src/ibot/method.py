"""The iBOT method as one module: student and EMA teacher, heads, centers and both losses.

Legend: G global crops, L local crops, V = G + L views, B images, N patches per global crop,
M masked patches in the batch, D embed dim, K prototypes.

Teacher (no grad, eval mode) sees the unmasked global crops; the student sees the masked
global crops and the local crops. Heads run only on [cls] tokens and *masked* patch tokens:
the patch loss needs nothing else, so the K-wide logits exist for ~15 % of patches.
The patch targets come from the module ``mim.target`` names (``ibot.losses.patch_targets``):
the teacher itself (iBOT), a fixed network or a codebook.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ibot.config import LossConfig, MimConfig, ModelConfig
from ibot.data.collate import Batch
from ibot.losses import DINOClsLoss, IBOTPatchLoss, KoLeoLoss, build_centering, build_patch_targets
from ibot.losses.patch_targets import gather_patches
from ibot.models.cnn_student import TimmCNN
from ibot.models.fit import tokenizer_branch
from ibot.models.heads import ProjectionHead
from ibot.models.init_weights import InitWeights
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime


@dataclass(frozen=True)
class LossOutput:
    """``total`` carries the graph; ``parts`` (per-loss values) and ``monitors`` are detached, for logging."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    monitors: dict[str, torch.Tensor]


@torch.no_grad()
def collapse_monitors(prefix: str, teacher_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """How close a branch is to either collapse, from its (..., K) teacher targets.

    ``teacher_entropy`` near ln K: uniform collapse (targets say nothing); ``prototypes_used``
    (distinct argmax in the batch) or ``perplexity`` (exp of the entropy of the batch-mean
    target) near 1: one prototype wins. No host sync: tensors, read only at log steps.
    """
    probs = teacher_probs.float().flatten(0, -2)
    if probs.shape[0] == 0:
        zero = probs.new_zeros(())
        return {f"{prefix}_{k}": zero for k in ("teacher_entropy", "prototypes_used", "perplexity")}
    used = torch.bincount(probs.argmax(dim=-1), minlength=probs.shape[-1]).gt(0).sum().float()
    return {
        f"{prefix}_teacher_entropy": entropy(probs).mean(),
        f"{prefix}_prototypes_used": used,
        f"{prefix}_perplexity": entropy(probs.mean(dim=0)).exp(),
    }


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dimension."""
    return -(probs * probs.clamp(min=1e-12).log()).sum(dim=-1)


@dataclass(frozen=True)
class HeadOutputs:
    """[cls] logits (V*B, K) for every view and patch logits (M, K) at masked positions."""

    cls_logits: torch.Tensor
    patch_logits: torch.Tensor


@dataclass(frozen=True)
class StudentOutputs:
    """The student's head outputs plus its backbone [cls] tokens of the global crops (G*B, D)."""

    heads: HeadOutputs
    global_cls: torch.Tensor


def _build_branch(model_cfg: ModelConfig, img_size: int, in_chans: int, cnn: str = "") -> nn.ModuleDict:
    """Backbone and heads: the ViT of ``model_cfg``, or timm's CNN ``cnn`` on its patch grid."""
    if cnn:
        backbone: nn.Module = TimmCNN(cnn, model_cfg.patch_size, in_chans, model_cfg.drop_path_rate)
    else:
        backbone = MaskedViT.from_config(model_cfg, img_size, in_chans)
    modules: dict[str, nn.Module] = {"backbone": backbone}
    if model_cfg.shared_head:
        modules["head"] = ProjectionHead.from_config(model_cfg, backbone.embed_dim)
    else:
        modules["cls_head"] = ProjectionHead.from_config(model_cfg, backbone.embed_dim)
        modules["patch_head"] = ProjectionHead.from_config(model_cfg, backbone.embed_dim)
    return nn.ModuleDict(modules)


def _rename_patch_center(state_dict: dict, prefix: str, *args) -> None:  # type: ignore[no-untyped-def]
    old = f"{prefix}patch_center.center"
    if old in state_dict:
        state_dict[f"{prefix}patch_targets.center.center"] = state_dict.pop(old)


class StudentTeacher(nn.Module):
    """What the training loop asks of a method beyond its loss, the same for pre-training and
    distillation: ``student`` and ``teacher`` ModuleDicts, each with a ``backbone``."""

    student: nn.ModuleDict
    teacher: nn.ModuleDict
    koleo_loss: nn.Module | None
    koleo_weight: float

    def train(self, mode: bool = True) -> StudentTeacher:
        """The teacher always stays in eval mode (no drop path), whatever ``mode`` is."""
        super().train(mode)
        self.teacher.train(False)
        return self

    def use_runtime(self, run: Runtime) -> None:
        """Both backbones take the run's attention path and residual-stream dtype (one place, so
        the training loop and the step benchmark cannot set the model up differently)."""
        for branch in (self.student, self.teacher):
            branch["backbone"].set_attention(run.attention)
            branch["backbone"].set_residual_dtype(run.residual_dtype)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.student["backbone"].set_activation_checkpointing(enabled)

    def compile_backbones(self) -> None:
        """``torch.compile`` both backbones in place (parameter names and checkpoints unchanged)."""
        for branch in (self.student, self.teacher):
            branch["backbone"].compile()

    def _heads(self, branch: nn.ModuleDict, cls_tokens: torch.Tensor, patch_tokens: torch.Tensor) -> HeadOutputs:
        """Project [cls] (X, D) and patch tokens (M, D); one packed call when the branch has one
        shared ``head``, else its ``cls_head`` and ``patch_head``."""
        if "head" in branch:
            logits = branch["head"](torch.cat([cls_tokens, patch_tokens]))
            return HeadOutputs(logits[: cls_tokens.shape[0]], logits[cls_tokens.shape[0] :])
        return HeadOutputs(branch["cls_head"](cls_tokens), branch["patch_head"](patch_tokens))

    def _add_koleo(
        self, total: torch.Tensor, parts: dict, global_cls: torch.Tensor, b: int, weight: float | None
    ) -> torch.Tensor:
        """``total`` plus KoLeo on the student's global [cls] (G*B, D), when ``loss.koleo_weight`` > 0;
        ``weight``: this step's (scheduled), None = ``loss.koleo_weight``."""
        if self.koleo_loss is None:
            return total
        # Per global crop, as DINOv2: neighbours are other images seen through the same view.
        koleo = sum(self.koleo_loss(c) for c in global_cls.view(-1, b, global_cls.shape[-1]))  # (G, B, D)
        parts["koleo"] = koleo.detach()
        return total + (self.koleo_weight if weight is None else weight) * koleo


class IBOT(StudentTeacher):
    """Student/teacher pair with the DINO [cls] loss and the iBOT masked-patch loss."""

    # The branch whose backbone is the run's model: saved as RUN/teacher.safetensors, scored by
    # the k-NN monitor (``ibot.distill_method.Distill``: the student).
    evaluated = "teacher"

    def __init__(
        self,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        img_size: int,
        mim_cfg: MimConfig | None = None,
        in_chans: int = 3,
        cnn: str = "",
    ) -> None:
        """``in_chans``: the channels of the crops (the run's ``data.channels``); ``cnn``: timm's
        CNN of that name as both backbones (``distill.student=timm:NAME``), else the ViT. A CNN
        cannot hide patches from itself: the patch loss then compares the student's and the
        teacher's tokens at the masked positions of an image both saw whole."""
        super().__init__()
        mim_cfg = mim_cfg or MimConfig()
        self.student = _build_branch(model_cfg, img_size, in_chans, cnn)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.cls_center = build_centering(loss_cfg.cls_centering, model_cfg.out_dim, loss_cfg.center_momentum)
        tokenizer = None
        if mim_cfg.target == "frozen":  # an earlier run's teacher branch, read here: the losses read no files
            tokenizer = tokenizer_branch(copy.deepcopy(self.teacher), mim_cfg.tokenizer_path)
        self.patch_targets = build_patch_targets(
            mim_cfg.target,
            self.teacher,
            build_centering(loss_cfg.patch_centering, model_cfg.out_dim, loss_cfg.center_momentum),
            model_cfg.out_dim,
            self.teacher["backbone"].embed_dim,
            tokenizer,
            mim_cfg.codebook_decay,
            mim_cfg.codebook_restart_steps,
        )
        # Checkpoints written before mim.target existed keep the patch center at its old name.
        self._register_load_state_dict_pre_hook(_rename_patch_center)
        # Sharpening off (an ablation): the teacher divides by the student's temperature.
        self.cls_sharpening = loss_cfg.cls_sharpening
        self.patch_sharpening = loss_cfg.patch_sharpening
        self.cls_loss = DINOClsLoss(loss_cfg.student_temp)
        self.patch_loss = IBOTPatchLoss(loss_cfg.student_temp)
        self.cls_weight = loss_cfg.cls_weight
        self.patch_weight = loss_cfg.patch_weight
        self.koleo_weight = loss_cfg.koleo_weight
        self.koleo_loss = KoLeoLoss() if loss_cfg.koleo_weight > 0 else None
        self.pair_ema_parameters()
        self.teacher.train(False)

    def start_from(self, init: InitWeights) -> None:
        """``model.init_from``'s weights into both branches."""
        init.load_into(self.student, self.teacher)

    def start_line(self) -> str:
        """What a run logs about its method at the start ("": nothing beyond the run's own line)."""
        backbone = self.student["backbone"]
        return f"pretrain: student and EMA teacher {backbone.describe()}" if isinstance(backbone, TimmCNN) else ""

    def pair_ema_parameters(self) -> None:
        """Pair student and teacher parameters for the EMA (again after sharding replaces them).

        Paired once: the EMA is one multi-tensor op over these lists.
        """
        self._student_params = list(self.student.parameters())
        self._teacher_params = list(self.teacher.parameters())
        # BatchNorm statistics (a CNN backbone; a ViT has no buffers) follow the student like the
        # weights, as timm's EMA models do: the teacher runs in eval mode on its running statistics.
        self._student_stats = [b for b in self.student.buffers() if b.is_floating_point()]
        self._teacher_stats = [b for b in self.teacher.buffers() if b.is_floating_point()]
        # The heads' pairs alone, for steps whose backbones are frozen (optim.freeze_backbone_epochs).
        heads = [name for name in self.student if name != "backbone"]
        self._student_head_params = [p for name in heads for p in self.student[name].parameters()]
        self._teacher_head_params = [p for name in heads for p in self.teacher[name].parameters()]

    @torch.no_grad()
    def teacher_logits(self, batch: Batch) -> tuple[HeadOutputs, torch.Tensor]:
        """Teacher on unmasked global crops -> [cls] logits (G*B, K), patch logits (M, K), patch tokens.

        The patch logits are computed only when the patch targets use them (online tokenizer);
        otherwise they are (0, K) and the teacher's head sees the [cls] tokens alone.
        """
        tokens = self.teacher["backbone"](batch.global_crops)
        wanted = batch.masked_indices() if self.patch_targets.uses_teacher_logits else batch.masked_indices()[:0]
        return self._heads(self.teacher, tokens.cls, gather_patches(tokens.patches, wanted)), tokens.patches

    def student_logits(self, batch: Batch) -> StudentOutputs:
        """Student on masked globals and locals -> [cls] logits (V*B, K), patch logits (M, K)."""
        backbone = self.student["backbone"]
        global_tokens = backbone(batch.global_crops, batch.mask)
        cls_tokens = global_tokens.cls
        if batch.local_crops.shape[0]:
            cls_tokens = torch.cat([cls_tokens, backbone(batch.local_crops).cls])
        heads = self._heads(self.student, cls_tokens, gather_patches(global_tokens.patches, batch.masked_indices()))
        return StudentOutputs(heads, global_tokens.cls)

    def forward(
        self, batch: Batch, teacher_temp: float, monitors: bool = False, koleo_weight: float | None = None
    ) -> LossOutput:
        """Both losses for one batch; also steps the two teacher centers (their only update).

        ``monitors``: also the collapse monitors (only worth their cost on steps that are logged).
        ``koleo_weight``: this step's KoLeo weight (scheduled); None = ``loss.koleo_weight``.
        """
        teacher, teacher_patches = self.teacher_logits(batch)
        student_out = self.student_logits(batch)
        student = student_out.heads
        b = batch.batch_size
        k = teacher.cls_logits.shape[-1]
        cls_temp = teacher_temp if self.cls_sharpening else self.cls_loss.student_temp
        patch_temp = teacher_temp if self.patch_sharpening else self.patch_loss.student_temp
        teacher_cls_probs = self.cls_center.probs(teacher.cls_logits, cls_temp).view(-1, b, k)  # (G, B, K)
        teacher_patch_probs = self.patch_targets(  # (M, K); steps the patch center / codebook
            batch.global_crops, batch.masked_indices(), (teacher_patches, teacher.patch_logits), patch_temp
        )
        cls_loss = self.cls_loss(student.cls_logits.view(-1, b, k), teacher_cls_probs)
        patch_loss = self.patch_loss(student.patch_logits, teacher_patch_probs, batch.mask, batch.masked_indices())
        self.cls_center.update(teacher.cls_logits)
        total = self.cls_weight * cls_loss + self.patch_weight * patch_loss
        parts = {"cls": cls_loss.detach(), "patch": patch_loss.detach()}
        watched = self._monitors(teacher_cls_probs, teacher_patch_probs, cls_loss, student) if monitors else {}
        total = self._add_koleo(total, parts, student_out.global_cls, b, koleo_weight)
        return LossOutput(total, parts, watched)

    @torch.no_grad()
    def _monitors(
        self, cls_probs: torch.Tensor, patch_probs: torch.Tensor, cls_loss: torch.Tensor, student: HeadOutputs
    ) -> dict[str, torch.Tensor]:
        """Collapse monitors of both branches plus the student-teacher KL of each."""
        out = {**collapse_monitors("cls", cls_probs), **collapse_monitors("patch", patch_probs)}
        # [cls]: every pair's cross-entropy minus its teacher entropy is its KL, and each teacher
        # view sits in the same number of pairs, so the mean KL is the loss minus the mean entropy.
        out["cls_kl"] = cls_loss.detach().float() - out["cls_teacher_entropy"]
        student_patch = torch.log_softmax(student.patch_logits.float() / self.patch_loss.student_temp, dim=-1)
        patch_kl = (patch_probs * (patch_probs.clamp(min=1e-12).log() - student_patch)).sum(-1)
        out["patch_kl"] = patch_kl.mean() if patch_kl.numel() else patch_kl.new_zeros(())
        return out

    @torch.no_grad()
    def update_teacher(self, momentum: float, backbone: bool = True) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, as one multi-tensor op.

        ``backbone=False``: the heads alone; the teacher's backbone stays as it is, also where the
        student's differs from it (a checkpoint's student and teacher, whose heads did not fit).
        """
        if backbone:
            torch._foreach_lerp_(self._teacher_params, self._student_params, 1.0 - momentum)
            if self._teacher_stats:
                torch._foreach_lerp_(self._teacher_stats, self._student_stats, 1.0 - momentum)
        else:
            torch._foreach_lerp_(self._teacher_head_params, self._student_head_params, 1.0 - momentum)

    def param_groups(self, split_backbone: bool = True) -> list[dict]:
        """The student's AdamW groups (``student_param_groups``).

        ``split_backbone=False``: the groups of checkpoints written before the backbone had its own.
        """
        return student_param_groups(self.student, split_backbone)


def student_param_groups(student: nn.ModuleDict, split_backbone: bool = True) -> list[dict]:
    """A student's parameters split by backbone or head (``optim.backbone_lr_scale``, the backbone
    freeze), weight decay (no decay for biases, norms, tokens) and last layer."""
    backbone = student["backbone"]
    no_decay_names = {f"backbone.{n}" for n in backbone.no_weight_decay()}
    groups: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = split_backbone and name.startswith("backbone.")
        decay = param.ndim > 1 and name not in no_decay_names
        last_layer = "last_layer" in name
        groups.setdefault((in_backbone, decay, last_layer), []).append(param)
    return [
        {"params": params, "apply_wd": decay, "is_last_layer": last_layer}
        | ({"is_backbone": in_backbone} if split_backbone else {})
        for (in_backbone, decay, last_layer), params in sorted(groups.items())
    ]
