"""Low-shot classification on frozen [cls] features: few labelled training images, many draws.

Each setting labels a subset of the training features: ``n`` images per class (class-balanced)
or a fraction of them (stratified: the fraction of every class, at least one image). Each
setting is drawn once per seed; on every draw two classifiers see only the labelled subset and
are scored on the whole test set:

- weighted k-NN (``knn_classify``, the DINO protocol; k capped by the labelled count);
- multinomial logistic regression (L2, L-BFGS, scikit-learn) on the [cls] standardised with the
  labelled subset's statistics, as the linear probes standardise with their training split.
  There is no validation split to pick its regularisation on (one image per class leaves
  none), so it is fixed (``eval.lowshot_logreg_c``), as in the iBOT/MSN semi-supervised logistic
  regression.

The features come from one cached extraction; only the labelled subset changes between draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ibot.errors import DataError
from ibot.eval.cluster import sklearn_module
from ibot.eval.knn import knn_classify


@dataclass(frozen=True)
class Setting:
    """``shots`` labelled images per class, or (shots 0) ``fraction`` of each class."""

    shots: int = 0
    fraction: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.shots} per class" if self.shots else f"{100 * self.fraction:g} %"


def draw_per_class(labels: torch.Tensor, shots: int, seed: int, classes: Sequence[str] = ()) -> torch.Tensor:
    """Indices of exactly ``shots`` images of every class, drawn with ``seed`` (sorted); ``classes``
    names the labels in errors."""
    return _draw(labels, seed, lambda count: shots, f"{shots} per class", classes)


def draw_fraction(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of ``fraction`` of every class's images (rounded, at least one), drawn with ``seed``."""
    return _draw(labels, seed, lambda count: max(1, round(fraction * count)), f"{100 * fraction:g} %", ())


def _draw(labels: torch.Tensor, seed: int, size, setting: str, classes: Sequence[str]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        n = size(len(members))
        if n > len(members):
            name = classes[c] if c < len(classes) else c
            raise DataError(f"low-shot {setting}: class {name} has only {len(members)} training images")
        picked.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.cat(picked).sort().values


def draw(labels: torch.Tensor, setting: Setting, seed: int, classes: Sequence[str] = ()) -> torch.Tensor:
    """The labelled indices of ``setting`` for draw ``seed`` (``classes`` names the labels in errors)."""
    if setting.shots:
        return draw_per_class(labels, setting.shots, seed, classes)
    return draw_fraction(labels, setting.fraction, seed)


@dataclass(frozen=True)
class Split:
    """Features (X, D) and labels (X,) of the labelled training images and of the test set."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...] = ()  # the labels' class names

    def labelled(self, idx: torch.Tensor) -> Split:
        """The same test set; only the training images at ``idx``."""
        return Split(self.train_x[idx], self.train_y[idx], self.test_x, self.test_y, self.classes)


def knn_top1(split: Split, k: int, temperature: float) -> float:
    """Weighted k-NN top-1 (%), k capped by the number of labelled images."""
    k = min(k, len(split.train_y))
    return knn_classify(split.train_x, split.train_y, split.test_x, split.test_y, (k,), temperature)[k][0]


def logreg_top1(split: Split, c: float) -> float:
    """Top-1 (%) of an L2 logistic regression (inverse strength ``c``) on standardised features."""
    linear_model = sklearn_module("linear_model")
    mean = split.train_x.mean(dim=0)
    std = split.train_x.std(dim=0).nan_to_num(1.0).clamp(min=1e-6)  # one image: std is NaN
    train = ((split.train_x - mean) / std).double().numpy()
    test = ((split.test_x - mean) / std).double().numpy()
    model = linear_model.LogisticRegression(C=c, max_iter=1000).fit(train, split.train_y.numpy())
    return 100.0 * float((model.predict(test) == split.test_y.numpy()).mean())


@dataclass(frozen=True)
class Spread:
    """One score over the draws: every run's value, their mean and sample std (Bessel; 0 for one draw)."""

    runs: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.runs))

    @property
    def std(self) -> float:
        return float(np.std(self.runs, ddof=1)) if len(self.runs) > 1 else 0.0

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "runs": list(self.runs)}


def mean_std(values: list[float]) -> dict:
    """{"mean", "std", "runs"}: std with Bessel's correction (0 for a single draw)."""
    return Spread(list(values)).as_dict()


@dataclass(frozen=True)
class LowshotRow:
    """One setting's result: its name, how many images were labelled, k-NN and logistic regression."""

    setting: str
    labelled: int  # the same on every draw: the per-class counts are fixed
    knn: Spread
    logreg: Spread

    def as_dict(self) -> dict:
        scores = {"knn": self.knn.as_dict(), "logreg": self.logreg.as_dict()}
        return {"setting": self.setting, "labelled": self.labelled, **scores}


@dataclass(frozen=True)
class LowshotProtocol:
    """The settings, the draw seeds and the two classifiers' parameters (``eval.lowshot_*``)."""

    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    knn_k: int
    knn_temperature: float
    logreg_c: float


def evaluate_setting(data: Split, setting: Setting, p: LowshotProtocol) -> LowshotRow:
    """One setting over every draw seed: labelled count, k-NN and logistic-regression mean/std."""
    knn, logreg, counts = [], [], []
    for seed in p.seeds:
        labelled = data.labelled(draw(data.train_y, setting, seed, data.classes))
        counts.append(len(labelled.train_y))
        knn.append(knn_top1(labelled, p.knn_k, p.knn_temperature))
        logreg.append(logreg_top1(labelled, p.logreg_c))
    return LowshotRow(setting.name, counts[0], Spread(knn), Spread(logreg))


def evaluate_lowshot(data: Split, p: LowshotProtocol) -> list[LowshotRow]:
    """Every setting of ``p`` (see ``evaluate_setting``) on the training pool and test set ``data``."""
    return [evaluate_setting(data, s, p) for s in p.settings]
