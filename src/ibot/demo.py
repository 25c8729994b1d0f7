"""``ibot demo``: pre-train on the embedded CIFAR-10 sample, then show what the pre-training learned.

The frozen teacher of each pre-training seed and random inits of the same shape at several
init seeds are scored with DINO's weighted k-NN on the embedded test images. The table gives
each row's mean +/- sample standard deviation over its seeds, and the teacher's lead over the
random init next to the random init's spread, so a reader can tell a gain from seed noise. It
is written to ``RUN/knn.md``; the k-NN results also go to ``RUN/eval/`` so that the run's
report (``ibot report``) shows them, and the report and an attention picture are written too.
"""

from __future__ import annotations

import json
import logging
import shlex
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ibot.config import Config
from ibot.run_folder import RunFolder

logger = logging.getLogger("ibot")

REPORT_K = 20  # the k of the one-line verdict (DINO's protocol reports k = 20)
OWN_RUN = "runs/my-images"  # the run folder of the commands the demo ends with


def own_folder_commands(config: str, run: str = OWN_RUN) -> list[str]:
    """The demo's steps on the user's own images, as the three commands it prints last: pre-train
    on DIR (its own mean / std measured: ``auto``), k-NN with labelled TRAIN_DIR / TEST_DIR (class
    sub-folders), and the teacher exported to ONNX (the one format every backbone has: timm's and
    transformers' ViTs lack the demo's conv stem)."""
    pretrain = ["ibot", "pretrain", "--config", config, "--output-dir", run]
    return [
        shlex.join([*pretrain, "data.path=DIR", "data.mean=auto", "data.std=auto"]),
        shlex.join(["ibot", "eval", "knn", run, "--train-dir", "TRAIN_DIR", "--test-dir", "TEST_DIR"]),
        shlex.join(["ibot", "export", run, "--format", "onnx", "--out", f"{run}-onnx"]),
    ]


@dataclass(frozen=True)
class Scores:
    """k-NN top-1 (%) of one kind of weights over seeds: ``top1[k]`` lists one value per seed."""

    label: str
    seeds: tuple[int, ...]
    top1: dict[int, list[float]] = field(default_factory=dict)

    def mean(self, k: int) -> float:
        return statistics.fmean(self.top1[k])

    def std(self, k: int) -> float | None:
        """Sample standard deviation over the seeds; None with a single seed."""
        return statistics.stdev(self.top1[k]) if len(self.top1[k]) > 1 else None


@dataclass(frozen=True)
class DemoResult:
    run_dir: Path  # the first pre-training seed's run: report and picture are of this one
    teacher: Scores
    random_init: Scores
    table: str
    knn_table: Path
    report: tuple[Path, Path]
    attention: Path
    train_minutes: float  # wall time of all pre-training runs
    eval_minutes: float  # wall time of every k-NN evaluation


def seed_run_dir(output_dir: str, base_seed: int, seed: int) -> Path:
    """The first seed's run is ``output_dir`` itself; further seeds go to ``output_dir/seed-N``."""
    return Path(output_dir) if seed == base_seed else Path(output_dir) / f"seed-{seed}"


def _cell(scores: Scores, k: int) -> str:
    std = scores.std(k)
    spread = f" +/- {std:.2f}" if std is not None else ""
    values = ", ".join(f"{v:.2f}" for v in scores.top1[k])
    return f"{scores.mean(k):.2f}{spread} ({values})"


def format_demo(teacher: Scores, random_init: Scores, ks: tuple[int, ...]) -> str:
    """Markdown table: teacher and random init (mean +/- sample std (per seed)) and the gain, per k."""
    head = "| weights | seeds | " + " | ".join(f"k={k} top-1 %" for k in ks) + " |"
    rule = "|---|---|" + "---|" * len(ks)
    rows = [
        f"| {s.label} | {', '.join(map(str, s.seeds))} | " + " | ".join(_cell(s, k) for k in ks) + " |"
        for s in (teacher, random_init)
    ]
    gain = "| teacher - random init (means) | | " + " | ".join(
        f"{teacher.mean(k) - random_init.mean(k):+.2f}" for k in ks
    )
    return "\n".join([head, rule, *rows, gain + " |"])


def verdict(teacher: Scores, random_init: Scores, k: int) -> str:
    """One sentence: the teacher's lead at ``k`` against the largest seed-to-seed spread measured."""
    gain = teacher.mean(k) - random_init.mean(k)
    spreads = [
        (s.std(k), name) for s, name in ((random_init, "random init"), (teacher, "teacher")) if s.std(k) is not None
    ]
    if not spreads:
        return f"k={k}: teacher - random init = {gain:+.2f} points (one seed each: no spread measured)"
    spread, name = max(spreads)
    times = f"{gain / spread:.1f}x" if spread > 0 else "inf x"
    learned = "more than" if gain > spread else "NOT more than"
    return (
        f"k={k}: teacher - random init = {gain:+.2f} points, {times} the seed-to-seed spread "
        f"(sample std of the {name}: {spread:.2f}): {learned} the spread"
    )


def _knn(backbone, cfg: Config, train_dir: str, test_dir: str, progress: bool) -> dict[int, float]:  # type: ignore[no-untyped-def]
    """k-NN top-1 (%) per ``cfg.eval.knn_k`` of a frozen backbone's final [cls] tokens."""
    from ibot.eval.features import extract_features, require_labels
    from ibot.eval.knn import knn_classify
    from ibot.runtime import Runtime

    runtime = Runtime.resolve(cfg.train)
    train_f = extract_features(backbone, train_dir, cfg, runtime, num_workers=0, progress=progress)
    test_f = extract_features(backbone, test_dir, cfg, runtime, num_workers=0, progress=progress)
    for folder, feats in ((train_dir, train_f), (test_dir, test_f)):
        require_labels(feats.labels, folder, "k-NN")
    results = knn_classify(
        train_f.last_cls, train_f.labels, test_f.last_cls, test_f.labels, cfg.eval.knn_k, cfg.eval.knn_temperature
    )
    return {k: top1 for k, (top1, _) in results.items()}


def _save_eval(run: RunFolder, scores: Scores, random_init: bool, train_dir: str, test_dir: str) -> None:
    """The seeds' mean in ``ibot eval knn``'s JSON shape, where ``ibot report`` looks for it."""
    result = {
        "weights": f"{scores.label}, mean of seeds {', '.join(map(str, scores.seeds))}",
        "train_dir": train_dir,
        "test_dir": test_dir,
        "seeds": list(scores.seeds),
        "knn": {k: {"top1": scores.mean(k), "top1_per_seed": scores.top1[k]} for k in scores.top1},
    }
    path = run.eval_result("knn", random_init)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def _clear_earlier_demo(out: Path) -> None:
    """A demo run is a fresh run: the run files of an earlier ``ibot demo`` in its folder go first
    (a new run refuses a folder that holds any, to keep a real run from being overwritten)."""
    stale = RunFolder(out).artefacts()
    if stale:
        logger.info("demo: replacing the earlier demo run in %s", out)
    for path in stale:
        path.unlink(missing_ok=True)


def run_demo(cfg: Config, seeds: int = 1, init_seeds: int = 3, progress: bool = True) -> DemoResult:
    """Pre-train ``seeds`` runs (train.seed, +1, ...), then k-NN of their teachers and of ``init_seeds`` random inits.

    Writes ``knn.md``, ``eval/knn*.json``, the report and ``pictures/attention.png`` into the
    first seed's run folder (``train.output_dir``), whose lock it holds throughout.
    """
    with RunFolder(seed_run_dir(cfg.train.output_dir, cfg.train.seed, cfg.train.seed)).lock("ibot demo"):
        return _run_demo(cfg, seeds, init_seeds, progress)


def _run_demo(cfg: Config, seeds: int, init_seeds: int, progress: bool) -> DemoResult:
    from ibot import visualize
    from ibot.eval.features import load_frozen
    from ibot.eval.monitor import KNNMonitor
    from ibot.models.fit import frozen_backbone
    from ibot.report import write_report
    from ibot.train.loop import train

    base = cfg.train.seed
    train_dir, test_dir = cfg.eval.train_path or cfg.data.path, cfg.eval.test_path
    run_dir = seed_run_dir(cfg.train.output_dir, base, base)
    run = RunFolder(run_dir)

    t0 = time.monotonic()
    runs = []
    for seed in range(base, base + seeds):
        out = seed_run_dir(cfg.train.output_dir, base, seed)
        seed_cfg = replace(cfg, train=replace(cfg.train, seed=seed, output_dir=str(out)))
        logger.info("demo: pre-training seed %d on %s for %s epochs -> %s", seed, cfg.data.path, cfg.optim.epochs, out)
        with RunFolder(out).lock("ibot demo"):  # cleared and re-run by this process alone
            _clear_earlier_demo(out)
            result = train(seed_cfg, resume=False, progress=progress, monitor=KNNMonitor)
        logger.info("pre-training: %d steps, %.1f images/s", result.step, result.images_per_second)
        runs.append(out)
    t1 = time.monotonic()

    ks = cfg.eval.knn_k
    teacher = Scores("iBOT teacher", tuple(range(base, base + seeds)), {k: [] for k in ks})
    for out in runs:
        frozen = load_frozen(str(out), on_cpu=True)
        backbone, run_cfg = frozen.backbone, frozen.cfg
        for k, top1 in _knn(backbone, run_cfg, train_dir, test_dir, progress).items():
            teacher.top1[k].append(top1)
    # The random inits are built from the first run's saved config: the very shape that was trained.
    run_cfg = load_frozen(str(run_dir), on_cpu=True).cfg
    random_init = Scores("random init, same shape", tuple(range(init_seeds)), {k: [] for k in ks})
    for seed in range(init_seeds):
        backbone = frozen_backbone(run_cfg, None, seed=seed)
        for k, top1 in _knn(backbone, run_cfg, train_dir, test_dir, progress).items():
            random_init.top1[k].append(top1)
    t2 = time.monotonic()

    table = format_demo(teacher, random_init, ks)
    knn_md = run_dir / "knn.md"
    k = REPORT_K if REPORT_K in ks else ks[0]
    knn_md.write_text(
        f"k-NN on [cls] (T = {cfg.eval.knn_temperature}), train {train_dir}, test {test_dir}\n\n"
        f"{table}\n\n{verdict(teacher, random_init, k)}\n"
    )
    _save_eval(run, teacher, False, train_dir, test_dir)
    _save_eval(run, random_init, True, train_dir, test_dir)
    report = write_report(run_dir)
    frozen = load_frozen(str(run_dir), on_cpu=True)
    backbone, run_cfg = frozen.backbone, frozen.cfg
    images = visualize.spread_images(test_dir, run_cfg, 8)
    attention = visualize.draw_attention(backbone, images, run_cfg, run.picture("attention"))
    return DemoResult(
        run_dir=run_dir,
        teacher=teacher,
        random_init=random_init,
        table=table,
        knn_table=knn_md,
        report=report,
        attention=attention,
        train_minutes=(t1 - t0) / 60,
        eval_minutes=(t2 - t1) / 60,
    )
