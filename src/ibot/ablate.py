"""Referee ablations: variants x seeds, each pre-trained under one budget and scored the same way.

``ibot ablate --config BASE --variants configs/ablations.yaml --seeds 0 1 2 --budget 5m``
pre-trains every (variant, seed) into ``OUTPUT/<variant>/seed<k>`` with the variant's dotted
overrides on top of BASE, scores the teacher (k-NN on the ``eval.monitor_*`` subsets of
``eval.train_path`` / ``eval.test_path``, and the mosaic patch probe of ``ibot eval dense``),
and prints a table of mean +/- std over seeds next to the final collapse monitors.

Resumable: a finished (variant, seed) keeps its scores in ``ablation_result.json`` and is not
run again; an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ibot.config import Config, load_config, read_yaml
from ibot.errors import ConfigError
from ibot.run_folder import RunFolder
from ibot.storage import atomic_write
from ibot.train.checkpoint import CheckpointStore

RESULT_NAME = "ablation_result.json"
MONITOR_KEYS = ("cls_teacher_entropy", "patch_teacher_entropy", "patch_prototypes_used", "patch_perplexity")


def load_variants(path: str | Path) -> dict[str, list[str]]:
    """``variants: {name: [dotted overrides]}`` from a YAML file, names and lists checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: variants file not found")
    data = read_yaml(path)  # a binary or invalid file: the config loader's one line naming it
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{path}: expected 'variants:' mapping each name to a list of overrides")
    out: dict[str, list[str]] = {}
    for name, overrides in variants.items():
        overrides = overrides or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{path}: variant {name!r} must be a list of key=value strings")
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{path}: variant name {name!r} must be letters, digits, '-' or '_'")
        out[str(name)] = overrides
    return out


def run_config(
    base: str | None, overrides: list[str], variant: list[str], seed: int, budget_minutes: float, out: Path
) -> Config:
    """The config of one (variant, seed) run; raises ``ConfigError`` naming a bad key at once."""
    return load_config(
        base,
        [
            *overrides,
            *variant,
            f"train.seed={seed}",
            f"train.output_dir={out}",
            f"train.budget_minutes={budget_minutes}",
        ],
    )


def final_monitors(run_dir: Path) -> dict[str, float]:
    """The last logged value of each collapse monitor in ``metrics.jsonl``."""
    from ibot.train.metrics import read_metrics

    found: dict[str, float] = {}
    path = RunFolder(run_dir).metrics
    for row in read_metrics(path) if path.is_file() else []:
        found.update({k: float(row[k]) for k in MONITOR_KEYS if k in row})
    return found


def score_run(cfg: Config, run_dir: Path, knn_monitor, patch_probe: bool, progress: bool) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """k-NN top-1 of the teacher on the monitor subsets, the patch probe's test mIoU, monitors."""
    from ibot.eval.commands import EvalRequest, run_dense
    from ibot.eval.features import load_frozen

    backbone = load_frozen(str(run_dir), on_cpu=True).backbone
    scores: dict[str, Any] = {"knn_top1": knn_monitor(backbone)["knn_top1"]}
    if patch_probe:
        dense = run_dense(EvalRequest(str(run_dir), progress=progress)).dense
        scores["patch_miou"] = next(r.test_miou for r in dense if r.features == "patch tokens")
    return {**scores, **final_monitors(run_dir)}


def _resume_mode(run_dir: Path) -> bool | str:
    """How ablate re-enters one of its run folders: resume a checkpoint; start over a run killed
    before its first checkpoint ("auto": the folder is ablate's own, its metrics are replaced from
    step 0); a new folder as a new run."""
    if CheckpointStore(run_dir).paths():
        return True
    return "auto" if RunFolder(run_dir).holds_run() else False


def run_ablation(
    base: str | None,
    overrides: list[str],
    variants: dict[str, list[str]],
    seeds: list[int],
    budget_minutes: float,
    output: str | Path,
    patch_probe: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every (variant, seed): pre-train (or resume, or skip when scored), score; the rows."""
    from ibot.eval.monitor import KNNMonitor
    from ibot.runtime import Runtime
    from ibot.train.loop import train

    output = Path(output)
    configs = {
        (name, seed): run_config(base, overrides, variant, seed, budget_minutes, output / name / f"seed{seed}")
        for name, variant in variants.items()
        for seed in seeds
    }  # every config built before the first run: a typo stops the ablation at once
    monitor = None
    rows = []
    for (name, seed), cfg in configs.items():
        run_dir = Path(cfg.train.output_dir)
        result_path = run_dir / RESULT_NAME
        if result_path.is_file():
            rows.append(json.loads(result_path.read_text()))
            continue
        with RunFolder(run_dir).lock("ibot ablate"):  # pre-trained, scored and its result kept by this process alone
            result = train(cfg, resume=_resume_mode(run_dir), progress=progress, monitor=KNNMonitor)
            if monitor is None:  # decoded once, shared by every run (same eval.* for all)
                monitor = KNNMonitor(cfg, Runtime.resolve(cfg.train))
            row = {
                "variant": name,
                "seed": seed,
                "steps": result.step,
                "train_minutes": result.train_minutes,
                **score_run(cfg, run_dir, monitor, patch_probe, progress),
            }
            atomic_write(result_path, lambda tmp, row=row: Path(tmp).write_text(json.dumps(row, indent=2)))
        rows.append(row)
    table = format_ablation(rows, list(variants))
    atomic_write(output / "ablation.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    atomic_write(output / "ablation.json", lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)))
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_ablation(rows: list[dict[str, Any]], order: list[str]) -> str:
    """Markdown: one line per variant, mean +/- std over its seeds."""
    columns = [
        ("knn_top1", "k-NN top-1 %", 2),
        ("patch_miou", "patch probe mIoU %", 2),
        ("steps", "steps", 0),
        ("cls_teacher_entropy", "[cls] teacher entropy", 2),
        ("patch_teacher_entropy", "patch teacher entropy", 2),
        ("patch_prototypes_used", "patch prototypes used", 0),
        ("patch_perplexity", "patch perplexity", 0),
    ]
    present = [c for c in columns if any(c[0] in r for r in rows)]
    lines = [
        "| variant | seeds | " + " | ".join(title for _, title, _ in present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for name in order:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        cells = []
        for key, _, digits in present:
            values = [float(r[key]) for r in mine if key in r]
            if not values:
                cells.append("")
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:.{digits}f} +/- {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}")
        lines.append(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
