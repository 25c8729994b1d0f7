"""Probes on frozen tokens, all trained at once on cached features, picked on a validation split.

Two families share one budget, optimiser and learning-rate sweep so their numbers compare:

- linear heads on the [cls] variants of the iBOT/DINO linear protocol: ``cls`` (last block),
  ``cls4`` (last 4 blocks concatenated), and each with the average patch token appended
  (``cls+avg``, ``cls4+avg``);
- aggregations of the patch tokens ("Beyond [cls]"): ``mean-pool`` (linear on the average
  patch token), ``attention-pool`` (AbMILP, Ilse et al. 2018: a small MLP scores each patch,
  softmax over patches, weighted sum, linear classifier) and ``attentive`` (one learned query
  cross-attending to the patches with several heads, as DINOv2/V-JEPA's attentive probe).

Features are standardised with statistics of the training split; each (probe, lr) pair is its
own module and they step together on the same mini-batches (independent parameters, so this
is the same as training them one by one, in one pass over the data).

A pick on an edge of the lr grid is a lower bound, so ``sweep`` extends the grid on that side
by one half-decade step (0.1 -> 0.3 -> 1 ...), trains the probes concerned at the new lr in one
more pass (same seed, so the same mini-batches) and picks again, up to ``max_extensions``
times. Results record how often a probe was extended and whether its pick is still on an edge.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ibot.config import EvalConfig
from ibot.eval.features import Features
from ibot.optim import cosine_schedule

# (cls (B, L, D), patches (B, N, D)) -> (B, F): the inputs of the linear heads.
LINEAR_INPUTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": lambda cls, patches: cls[:, -1],
    "cls4": lambda cls, patches: cls[:, -4:].flatten(1),
    "cls+avg": lambda cls, patches: torch.cat([cls[:, -1], patches.mean(dim=1)], dim=1),
    "cls4+avg": lambda cls, patches: torch.cat([cls[:, -4:].flatten(1), patches.mean(dim=1)], dim=1),
    "mean-pool": lambda cls, patches: patches.mean(dim=1),
}
POOLING_PROBES = ("attention-pool", "attentive")
PROBES = (*LINEAR_INPUTS, *POOLING_PROBES)  # the default of eval.probes
LRS = EvalConfig.probe_lrs  # the config default: one grid for callers with and without a config


class LinearProbe(nn.Module):
    """A linear classifier on one of ``LINEAR_INPUTS``."""

    def __init__(self, input_name: str, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.input = LINEAR_INPUTS[input_name]
        self.linear = nn.Linear(in_dim, num_classes)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return self.linear(self.input(cls, patches))


class AttentionPoolProbe(nn.Module):
    """AbMILP: ``a = softmax_i(w^T tanh(V p_i))``, ``logits = W sum_i a_i p_i + b``."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.linear = nn.Linear(dim, num_classes)

    def attention(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N) pooling weights (sum to 1 over the patches): the heat map."""
        return torch.softmax(self.score(patches).squeeze(-1), dim=1)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        pooled = torch.einsum("bn,bnd->bd", self.attention(patches), patches)
        return self.linear(pooled)


class AttentiveProbe(nn.Module):
    """One learned query, multi-head cross-attention over the patch tokens, then a linear layer."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4) -> None:
        super().__init__()
        heads = math.gcd(num_heads, dim)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.attn(self.query.expand(patches.shape[0], -1, -1), patches, patches, need_weights=False)
        return self.linear(self.norm(pooled.squeeze(1)))


def build_probe(name: str, num_blocks: int, dim: int, num_classes: int) -> nn.Module:
    """The probe ``name`` for tokens of width ``dim`` from ``num_blocks`` blocks."""
    if name in LINEAR_INPUTS:
        in_dim = LINEAR_INPUTS[name](torch.zeros(1, num_blocks, dim), torch.zeros(1, 1, dim)).shape[1]
        return LinearProbe(name, in_dim, num_classes)
    if name == "attention-pool":
        return AttentionPoolProbe(dim, num_classes)
    if name == "attentive":
        return AttentiveProbe(dim, num_classes)
    raise ValueError(f"unknown probe {name!r}; choose from {', '.join(PROBES)}")


@dataclass(frozen=True)
class Standardiser:
    """Per-dimension mean/std of the training split's [cls] (per block) and patch tokens."""

    cls_mean: torch.Tensor
    cls_std: torch.Tensor
    patch_mean: torch.Tensor
    patch_std: torch.Tensor

    @staticmethod
    def fit(cls: torch.Tensor, patches: torch.Tensor) -> Standardiser:
        """``cls`` (X, L, D) and ``patches`` (Y, N, D): a sample of images is enough for the patches."""
        patch_sample = patches.float().flatten(0, 1)
        return Standardiser(
            cls.mean(dim=0),
            cls.std(dim=0).clamp(min=1e-6),
            patch_sample.mean(dim=0),
            patch_sample.std(dim=0).clamp(min=1e-6),
        )

    def __call__(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (cls.float() - self.cls_mean) / self.cls_std, (patches.float() - self.patch_mean) / self.patch_std


@dataclass(frozen=True)
class ProbeResult:
    """The learning rate picked on validation for one probe, its accuracies (top-1, %), the module."""

    probe: str
    lr: float
    val_top1: float
    test_top1: float
    module: nn.Module
    standardise: Standardiser  # the module's inputs are standardised tokens
    lr_edge: str | None = None  # "upper" / "lower": the pick is still on that edge of the lrs tried
    extended: int = 0  # lrs tried beyond the configured grid

    def as_dict(self) -> dict[str, float | str | int | None]:
        return {
            "probe": self.probe,
            "lr": self.lr,
            "val_top1": self.val_top1,
            "test_top1": self.test_top1,
            "lr_edge": self.lr_edge,
            "extended": self.extended,
        }


def split_indices(num: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, val) indices: a seeded ``val_fraction`` of ``num`` held out for picking the lr."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    num_val = max(1, int(round(num * val_fraction)))
    return order[num_val:], order[:num_val]


def fit_sweep(
    modules: list[nn.Module],
    lrs: list[float],
    fit_idx: torch.Tensor,
    loss_fn: Callable[[list[nn.Module], torch.Tensor], torch.Tensor],
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> None:
    """Train ``modules[i]`` at ``lrs[i]``, all on the same shuffled mini-batches of ``fit_idx``.

    AdamW without weight decay, cosine decay to 0; ``loss_fn(modules, batch_idx)`` returns the
    *sum* of the modules' losses (their parameters are disjoint, so each gets its own gradient).
    """
    optimizer = torch.optim.AdamW(
        [{"params": m.parameters(), "lr": lr, "base_lr": lr} for m, lr in zip(modules, lrs)], weight_decay=0.0
    )
    steps_per_epoch = max(1, len(fit_idx) // batch_size)
    total = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    for m in modules:
        m.train()
    with tqdm(total=total, desc="probes", disable=not progress) as bar:
        for step in range(total):
            if step % steps_per_epoch == 0:
                order = fit_idx[torch.randperm(len(fit_idx), generator=generator)]
            start = (step % steps_per_epoch) * batch_size
            scale = cosine_schedule(step, total, 1.0, 0.0)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * scale
            loss = loss_fn(modules, order[start : start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
    for m in modules:
        m.eval()


def beyond(lr: float, edge: str) -> float:
    """The next lr past ``lr`` on the half-decade grid (1, 3, 10, 30, ...) towards ``edge``.

    ``0.1`` -> ``0.3`` -> ``1`` upwards, ``1e-3`` -> ``3e-4`` downwards; an lr off the grid
    moves to the first grid point strictly beyond it.
    """
    step = 1 if edge == "upper" else -1
    k = round(2 * math.log10(lr)) - step  # one grid point back: the loop stops at the first one past lr
    while True:
        k += step
        value = float(f"{10 ** (k / 2):.0e}")
        if (value > lr) if step > 0 else (value < lr):
            return value


@dataclass(frozen=True)
class Trial:
    """One (probe, lr) trained: its module and validation score."""

    lr: float
    module: nn.Module
    score: float


@dataclass(frozen=True)
class Pick:
    """The best trial of one probe among the lrs tried (sorted), and how many were extensions."""

    trial: Trial
    tried: tuple[float, ...]
    extended: int

    @property
    def edge(self) -> str | None:
        """``"upper"`` / ``"lower"`` when the pick is the largest / smallest of two or more lrs tried."""
        if len(self.tried) < 2:
            return None
        return {self.tried[-1]: "upper", self.tried[0]: "lower"}.get(self.trial.lr)


def pick_trial(trials: list[Trial], extended: int) -> Pick:
    """The best-scoring trial; ties go to the larger lr (on a flat stretch where nothing trains
    yet, larger is the way to go; on a flat top the grid grows upwards, which only costs time)."""
    ordered = sorted(trials, key=lambda t: t.lr)
    best = max(ordered, key=lambda t: (t.score, t.lr))
    return Pick(best, tuple(t.lr for t in ordered), extended)


def sweep(
    names: tuple[str, ...],
    lrs: tuple[float, ...],
    build: Callable[[str], nn.Module],
    train: Callable[[list[nn.Module], list[float]], None],
    score: Callable[[list[nn.Module]], list[float]],
    max_extensions: int,
) -> dict[str, Pick]:
    """Per name, the best of ``build(name)`` trained at every lr (higher ``score`` is better).

    ``train(modules, lrs)`` fits modules at their lrs together; a name whose pick lies on an
    edge of its lrs gets the next lr beyond it (``beyond``), up to ``max_extensions`` times.
    Every lr of a name starts from the same copy of one ``build(name)``: the picks compare
    learning rates, not initialisations (at a tiny lr the init is all that is scored).
    """
    initial = {name: build(name) for name in names}
    trials: dict[str, list[Trial]] = {name: [] for name in names}
    grid = sorted(set(lrs))
    pending = [(name, lr) for name in names for lr in grid]
    for _ in range(max_extensions + 1):
        modules = [copy.deepcopy(initial[name]) for name, _ in pending]
        train(modules, [lr for _, lr in pending])
        for (name, lr), module, value in zip(pending, modules, score(modules)):
            trials[name].append(Trial(lr, module, value))
        picks = {name: pick_trial(t, len(t) - len(grid)) for name, t in trials.items()}
        pending = [(name, beyond(p.trial.lr, p.edge)) for name, p in picks.items() if p.edge]
        if not pending:
            break
    return picks


@torch.no_grad()
def _accuracy(
    modules: list[nn.Module],
    cls: torch.Tensor,
    patches: torch.Tensor,
    labels: torch.Tensor,
    standardise: Standardiser,
    batch_size: int = 1024,
) -> list[float]:
    correct = [0] * len(modules)
    for start in range(0, len(labels), batch_size):
        c, p = standardise(cls[start : start + batch_size], patches[start : start + batch_size])
        y = labels[start : start + batch_size]
        for i, module in enumerate(modules):
            correct[i] += int((module(c, p).argmax(dim=1) == y).sum())
    return [100.0 * n / max(1, len(labels)) for n in correct]


def train_probes(
    train: Features,
    test: Features,
    probes: tuple[str, ...] = PROBES,
    lrs: tuple[float, ...] = LRS,
    epochs: int = 10,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    max_extensions: int = 3,
) -> list[ProbeResult]:
    """Train every probe at every learning rate; per probe, the lr with the best validation top-1.

    The validation split is ``val_fraction`` of ``train`` drawn with ``seed``, never trained on;
    picks on an edge of ``lrs`` extend it (``sweep``).
    """
    if train.patches is None or test.patches is None:
        raise ValueError("probes need patch tokens: extract features with patches=True")
    if bool((train.labels < 0).any()) or bool((test.labels < 0).any()):
        raise ValueError("probes need labelled images: one sub-folder per class")
    torch.manual_seed(seed)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    _, num_blocks, dim = train.cls.shape
    fit_idx, val_idx = split_indices(len(train.labels), val_fraction, seed)
    standardise = Standardiser.fit(train.cls[fit_idx], train.patches[fit_idx[:4096]])

    def loss_fn(mods: list[nn.Module], idx: torch.Tensor) -> torch.Tensor:
        cls, patches = standardise(train.cls[idx], train.patches[idx])
        return sum(F.cross_entropy(m(cls, patches), train.labels[idx]) for m in mods)

    picks = sweep(
        probes,
        lrs,
        lambda name: build_probe(name, num_blocks, dim, num_classes),
        lambda mods, rates: fit_sweep(mods, rates, fit_idx, loss_fn, epochs, batch_size, seed, progress),
        lambda mods: _accuracy(mods, train.cls[val_idx], train.patches[val_idx], train.labels[val_idx], standardise),
        max_extensions,
    )
    results = []
    for name, pick in picks.items():
        best = pick.trial
        (test_top1,) = _accuracy([best.module], test.cls, test.patches, test.labels, standardise)
        results.append(
            ProbeResult(name, best.lr, best.score, test_top1, best.module, standardise, pick.edge, pick.extended)
        )
    return results
