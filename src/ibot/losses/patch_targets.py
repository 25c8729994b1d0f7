"""Where the targets of the masked-patch loss come from (``mim.target``), chosen at construction.

- ``online`` (iBOT): the EMA teacher's own patch distributions, centred and sharpened; the
  tokenizer learns with the student.
- ``random``: the same, from a copy of the teacher frozen at its random initialisation.
- ``frozen``: from the teacher of an earlier run, frozen (the multi-stage pipeline of BEiT-like
  methods that iBOT's online tokenizer removes); the caller reads it (``ibot.models.reader``).
- ``vq``: the EMA teacher's patch tokens quantised to the nearest entry of a learned codebook
  (one-hot targets over the K codes; the student's patch head predicts the code index).
- ``none`` (plain DINO) needs no module here: the loader draws no masks, so the patch loss
  sees zero masked tokens and contributes nothing.

Every module maps the teacher's view of a batch to (M, K) target probabilities at the masked
positions and steps its own running state (centers, codebook) in the same call:
``targets(global_crops, flat_indices, (teacher patch tokens, teacher patch logits), teacher_temp)``.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ibot.config import MIM_TARGETS
from ibot.losses.centering import _distributed


def gather_patches(patches: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor:
    """(C, N, D) patch tokens -> (M, D) rows at flat indices into C*N (no host sync, unlike a bool mask)."""
    return patches.flatten(0, 1).index_select(0, flat_indices)


class TeacherTargets(nn.Module):
    """Online tokenizer: the teacher's patch logits (computed with its [cls] logits) -> centred probs."""

    uses_teacher_logits = True

    def __init__(self, centering: nn.Module) -> None:
        super().__init__()
        self.center = centering

    def forward(
        self, global_crops: torch.Tensor, flat_indices: torch.Tensor, teacher: tuple, teacher_temp: float
    ) -> torch.Tensor:
        """``teacher`` = (patch tokens (C, N, D), patch logits (M, K)) -> probs (M, K)."""
        _, logits = teacher
        probs = self.center.probs(logits, teacher_temp)
        self.center.update(logits)
        return probs


class FixedNetworkTargets(nn.Module):
    """A frozen backbone + head (random init or an earlier run's teacher) -> centred probs."""

    uses_teacher_logits = False

    def __init__(self, branch: nn.ModuleDict, centering: nn.Module) -> None:
        super().__init__()
        self.branch = branch
        self.branch.requires_grad_(False)
        self.branch.train(False)
        self.center = centering
        self.head_name = "head" if "head" in branch else "patch_head"

    def train(self, mode: bool = True) -> FixedNetworkTargets:
        super().train(mode)
        self.branch.train(False)  # a fixed tokenizer never drops paths
        return self

    @torch.no_grad()
    def forward(
        self, global_crops: torch.Tensor, flat_indices: torch.Tensor, teacher: tuple, teacher_temp: float
    ) -> torch.Tensor:
        tokens = self.branch["backbone"](global_crops)
        logits = self.branch[self.head_name](gather_patches(tokens.patches, flat_indices))
        probs = self.center.probs(logits, teacher_temp)
        self.center.update(logits)
        return probs


class CodebookTargets(nn.Module):
    """VQ tokenizer: nearest codebook entry of each masked teacher patch token, as a one-hot target.

    Cosine VQ: tokens and codes are L2-normalised, so the nearest code is the most similar one.
    The codebook is learned by EMA k-means (cluster sizes and sums, all-reduced across
    processes): no gradient reaches the teacher, so a commitment loss would have nothing to
    pull. A code unused for ``restart_steps`` steps is restarted at a random token of the batch,
    which keeps usage high (dead codes are the usual failure of VQ tokenizers).
    """

    uses_teacher_logits = False
    codebook: torch.Tensor
    cluster_size: torch.Tensor
    code_sum: torch.Tensor
    idle_steps: torch.Tensor
    initialised: torch.Tensor

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, restart_steps: int = 100) -> None:
        super().__init__()
        self.decay = decay
        self.restart_steps = restart_steps
        self.register_buffer("codebook", F.normalize(torch.randn(num_codes, dim), dim=-1))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("code_sum", torch.zeros(num_codes, dim))
        self.register_buffer("idle_steps", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def assign(self, tokens: torch.Tensor) -> torch.Tensor:
        """(M, D) tokens -> (M,) index of the most similar code."""
        return (F.normalize(tokens.float(), dim=-1) @ self.codebook.t()).argmax(dim=-1)

    @torch.no_grad()
    def forward(
        self, global_crops: torch.Tensor, flat_indices: torch.Tensor, teacher: tuple, teacher_temp: float
    ) -> torch.Tensor:
        patches, _ = teacher
        tokens = F.normalize(gather_patches(patches, flat_indices).float(), dim=-1)  # (M, D)
        if not bool(self.initialised):  # the first batch seeds every code (k-means style)
            self._restart(torch.ones_like(self.idle_steps, dtype=torch.bool), tokens)
            self.initialised.fill_(True)
        codes = self.assign(tokens)
        one_hot = F.one_hot(codes, self.codebook.shape[0]).float()  # (M, K)
        self._update(tokens, one_hot)
        return one_hot

    def _update(self, tokens: torch.Tensor, one_hot: torch.Tensor) -> None:
        counts, sums = one_hot.sum(dim=0), one_hot.t() @ tokens  # (K,), (K, D)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.code_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        used = self.cluster_size > 1e-6
        centroids = F.normalize(self.code_sum, dim=-1)
        self.codebook.copy_(torch.where(used.unsqueeze(1), centroids, self.codebook))
        self.idle_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = self.idle_steps >= self.restart_steps
        if bool(dead.any()):  # the same on every process: counts are all-reduced
            self._restart(dead, tokens)

    def _restart(self, which: torch.Tensor, tokens: torch.Tensor) -> None:
        """Codes in ``which`` (K,) bool -> random tokens of this batch (rank 0's, broadcast)."""
        if tokens.shape[0]:
            picks = torch.randint(tokens.shape[0], (self.codebook.shape[0],), device=tokens.device)
            fresh = F.normalize(tokens[picks] + 1e-3 * torch.randn_like(self.codebook), dim=-1)  # jitter splits twins
        else:  # nothing masked here: keep the codes (another process may still send its tokens)
            fresh = self.codebook.clone()
        if _distributed():
            dist.broadcast(fresh, 0)
        mask = which.unsqueeze(1)
        self.codebook.copy_(torch.where(mask, fresh, self.codebook))
        self.code_sum.copy_(torch.where(mask, fresh, self.code_sum))
        self.cluster_size.masked_fill_(which, 1.0)
        self.idle_steps.masked_fill_(which, 0)


def build_patch_targets(
    target: str,
    teacher: nn.ModuleDict,
    centering: nn.Module,
    num_prototypes: int,
    embed_dim: int,
    tokenizer: nn.ModuleDict | None = None,
    codebook_decay: float = 0.99,
    codebook_restart_steps: int = 100,
) -> nn.Module:
    """The module named by ``mim.target`` (``none`` uses the online module on zero masked tokens).

    ``tokenizer``: for ``frozen``, the earlier run's teacher branch, built and loaded by the caller
    (``ibot.models.fit.tokenizer_branch``): the losses read no files.
    """
    if target in ("online", "none"):
        return TeacherTargets(centering)
    if target == "random":
        return FixedNetworkTargets(copy.deepcopy(teacher), centering)
    if target == "frozen":
        if tokenizer is None:
            raise ValueError("mim.target=frozen: no tokenizer branch given")
        return FixedNetworkTargets(tokenizer, centering)
    if target == "vq":
        return CodebookTargets(num_prototypes, embed_dim, codebook_decay, codebook_restart_steps)
    raise ValueError(f"mim.target: expected one of {MIM_TARGETS}, got {target!r}")
