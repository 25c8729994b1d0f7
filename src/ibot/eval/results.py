"""Typed results of the ``ibot eval`` commands: what each computed, its JSON and its table.

Each ``*Report`` is what one command returns. ``as_dict()`` is the JSON kept in
``RUN/eval/<command>.json`` (read back by ``ibot report``); the ``format_*`` functions print the
same numbers as a Markdown table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # annotations only: the CLI builds its parser from the registry without loading these
    from ibot.eval.dense import DenseResult
    from ibot.eval.lowshot import LowshotRow, Spread
    from ibot.eval.probes import ProbeResult
    from ibot.eval.retrieval import RetrievalScores
    from ibot.eval.robustness import RobustnessResult


def _plain(value: Any) -> Any:
    """``value`` as JSON-able data: nested results through their own ``as_dict``."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class EvalReport:
    """What every command reports: the weights it scored and the files it skipped (counts by reason).

    ``flat``: fields whose own keys stand at the top level of the JSON (as the result files
    have always been written).
    """

    weights: str
    skipped: dict[str, Any]  # ``SkipLog.as_counts()``: skipped_images, skipped_by_reason

    flat: ClassVar[tuple[str, ...]] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = _plain(getattr(self, f.name))
            if f.name == "skipped" or f.name in self.flat:
                out.update(value)
            else:
                out[f.name] = value
        return out


@dataclass(frozen=True)
class TopK:
    top1: float
    top5: float

    def as_dict(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5}


@dataclass(frozen=True)
class KnnReport(EvalReport):
    train_images: int
    test_images: int
    knn: dict[int, TopK]  # k -> accuracies (%)


@dataclass(frozen=True)
class ProbeReport(EvalReport):
    train_images: int
    test_images: int
    probes: list[ProbeResult]


@dataclass(frozen=True)
class RobustnessReport(EvalReport):
    probe: str
    lr: float
    test_top1_all_clean: float  # the probe on the whole clean test folder
    benchmark: RobustnessResult

    flat: ClassVar[tuple[str, ...]] = ("benchmark",)


@dataclass(frozen=True)
class FinetuneReport(EvalReport):
    settings: dict[str, Any]  # the finetune.* config
    test_top1: float
    train_loss: float
    epochs: float
    steps: int


@dataclass(frozen=True)
class DenseReport(EvalReport):
    mosaics: str  # e.g. "2x2, 64 train / 32 test"
    dense: list[DenseResult]


@dataclass(frozen=True)
class RetrievalReport(EvalReport):
    train_images: int
    test_images: int
    index: str  # the faiss index searched
    scores: RetrievalScores

    flat: ClassVar[tuple[str, ...]] = ("scores",)


@dataclass(frozen=True)
class ClusterReport(EvalReport):
    split: str
    images: int
    clusters: int
    restarts: int
    best_restart: int
    inertia: float
    accuracy: float  # %, each cluster mapped to one class (Hungarian)
    nmi: float
    ari: float
    fmi: float


@dataclass(frozen=True)
class LowshotReport(EvalReport):
    train_images: int
    test_images: int
    draws: list[int]
    knn_k: int
    logreg_c: float
    lowshot: list[LowshotRow]


# --- tables -------------------------------------------------------------------------------------


def format_lr(lr: float, extended: int = 0, lr_edge: str | None = None) -> str:
    """The picked lr, with how often its grid was extended and whether it is still on an edge."""
    notes = [f"extended {extended}x"] if extended else []
    notes += [f"{lr_edge} edge"] if lr_edge else []
    return f"{lr:g}" + (f" ({', '.join(notes)})" if notes else "")


def format_knn(*reports: KnnReport) -> str:
    ks = list(reports[0].knn)
    head = "| weights | " + " | ".join(f"k={k} top-1 / top-5" for k in ks) + " |"
    rule = "|---|" + "---|" * len(ks)
    rows = [
        f"| {r.weights} | " + " | ".join(f"{r.knn[k].top1:.2f} / {r.knn[k].top5:.2f}" for k in ks) + " |"
        for r in reports
    ]
    return "\n".join([head, rule, *rows])


def format_probe(report: ProbeReport) -> str:
    rows = [
        f"| {p.probe} | {format_lr(p.lr, p.extended, p.lr_edge)} | {p.val_top1:.2f} | {p.test_top1:.2f} |"
        for p in report.probes
    ]
    head = f"| probe ({report.weights}) | lr (picked on val) | val top-1 | test top-1 |"
    return "\n".join([head, "|---|---|---|---|", *rows])


def format_robustness(report: RobustnessReport) -> str:
    b = report.benchmark
    rows = [f"| {name} | {top1:.2f} |" for name, top1 in b.as_dict()["per_corruption"].items()]
    head = f"| corruption ({report.weights}, probe {report.probe}) | top-1, mean of severities 1-5 |"
    tail = [
        f"| clean (same images) | {b.clean_top1:.2f} |",
        f"| **mean corrupted** | **{b.mean_corrupted_top1:.2f}** |",
    ]
    return "\n".join([head, "|---|---|", *rows, *tail])


def format_finetune(report: FinetuneReport) -> str:
    return "\n".join(
        [
            f"| fine-tuning ({report.weights}, {report.epochs:g} epochs) | test top-1 |",
            "|---|---|",
            f"| | {report.test_top1:.2f} |",
        ]
    )


def format_dense(report: DenseReport) -> str:
    rows = [
        f"| {d.features} | {format_lr(d.lr, d.extended, d.lr_edge)} | {d.test_miou:.2f} | {d.test_pixel_accuracy:.2f} |"
        for d in report.dense
    ]
    head = f"| features ({report.weights}, mosaics {report.mosaics}) | lr | test mIoU | pixel accuracy |"
    return "\n".join([head, "|---|---|---|---|", *rows])


def format_retrieval(*reports: RetrievalReport) -> str:
    head = "| weights | index | mAP@R | recall@1 | recall@5 |"
    rows = [
        f"| {r.weights} | {r.index} | {r.scores.map_at_r:.2f} | {r.scores.recall[1]:.2f} | {r.scores.recall[5]:.2f} |"
        for r in reports
    ]
    return "\n".join([head, "|---|---|---|---|---|", *rows])


def format_cluster(report: ClusterReport) -> str:
    r = report
    head = f"| k-means on [cls] ({r.weights}, {r.split} split) | k | accuracy (Hungarian) |"
    row = f"| {r.images} images | {r.clusters} | {r.accuracy:.2f} | {r.nmi:.3f} | {r.ari:.3f} | {r.fmi:.3f} |"
    return "\n".join([head + " NMI | ARI | FMI |", "|---|---|---|---|---|---|", row])


def format_lowshot(report: LowshotReport) -> str:
    def cell(scores: Spread) -> str:
        return f"{scores.mean:.2f} ± {scores.std:.2f}"

    head = (
        f"| labels ({report.weights}, {len(report.draws)} draws) | labelled images "
        f"| k-NN (k<={report.knn_k}) top-1 | logistic regression top-1 |"
    )
    rows = [f"| {r.setting} | {r.labelled} | {cell(r.knn)} | {cell(r.logreg)} |" for r in report.lowshot]
    return "\n".join([head, "|---|---|---|---|", *rows])
