"""Distilled against scratch students for the same CPU minutes: k-NN of teacher and students.

What ``ibot distill`` is for, measured (issue 30): a frozen teacher (``--teacher``: a run folder,
its checkpoint with heads) distilled into cheaper students, each against the same student
pre-trained from scratch by ``ibot pretrain``, for the same training minutes on the same
images. Students (``--students``):

- ``vit4``: a 4-block ViT-Pico (width 48) of the recipe's patch size and stem;
- ``resnet18``: timm's ResNet-18 (``distill.student=timm:resnet18``), from timm's random init;
- ``resnet10t``: timm's ResNet-10-T, the same way.

Variants (``--variants``):

- ``distill``: ``distill.objective=auto`` (the teacher's heads give the prototype objective);
- ``regression``: ``distill.objective=regression`` (the teacher's normalised tokens);
- ``ema_head``: ``distill.objective=ema_head`` (the prototype losses through a teacher head trained
  with the student, as for a teacher file without heads);
- ``scratch``: ``ibot pretrain`` of the same student. A CNN pre-trained from scratch is DINO on its
  pooled feature plus the patch loss on its unmasked feature grid, since a CNN cannot hide
  patches from itself (docs/distill.md).

Runs go two at a time (``--parallel``), each with ``train.threads=1`` and ``--budget`` training
minutes, in the order student, seed, variant: the variants of one student and seed share the
machine at the same time, so what else runs on it slows them alike. Each run folder is scored
afterwards by ``ibot eval knn`` on the whole ``--train`` / ``--test`` folders (the student's
[cls] or pooled feature; k = 20 is the table's column), as is the teacher. A finished run is read,
not rerun; an unfinished one resumes from its checkpoint; a folder run with other settings, or
a teacher file that changed, is refused with one line.

    python benchmarks/distill_cifar10.py --teacher runs/teacher --out runs/distill_bench \\
        --students vit4 resnet18 --variants distill scratch --minutes 6

Prints a Markdown table: per student and variant, the student's multiply-adds per 32 px image
(and the teacher's over it), the optimiser steps reached (mean over seeds) and k-NN top-1 (k=20)
as mean ± std over seeds, with each seed's value.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from continue_pretraining import _path, sha256  # noqa: E402

from ibot.train.metrics import read_metrics  # noqa: E402

STUDENTS = {
    "vit4": ["model.arch=vit_pico", "model.depth=4"],
    "resnet18": ["distill.student=timm:resnet18"],
    "resnet10t": ["distill.student=timm:resnet10t"],
}
VARIANTS = {
    "distill": ("distill", ["distill.objective=auto"]),
    "regression": ("distill", ["distill.objective=regression"]),
    "ema_head": ("distill", ["distill.objective=ema_head"]),
    "scratch": ("pretrain", []),
}
SETTINGS = "distill_cifar10.json"  # in each run folder: what it was run with
KNN = "knn_full.json"  # in each run folder: ibot eval knn's result on the whole folders
TRAINED = "distill_cifar10.trained"  # in each run folder: its ibot command finished
K = 20


class BenchError(SystemExit):
    """A one-line refusal (exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"distill_cifar10: error: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the teacher's run folder (its checkpoint.pt)")
    parser.add_argument("--out", required=True, help="one run folder per student, variant and seed goes here")
    parser.add_argument("--config", default=str(ROOT / "configs" / "cifar10.yaml"), help="the recipe")
    parser.add_argument("--train", default=None, help="train folder (default: the recipe's eval.train_path)")
    parser.add_argument("--test", default=None, help="test folder (default: the recipe's eval.test_path)")
    parser.add_argument("--students", nargs="+", default=["vit4", "resnet18"], choices=sorted(STUDENTS))
    parser.add_argument("--variants", nargs="+", default=["distill", "scratch"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed of each repeat")
    parser.add_argument("--minutes", type=float, default=6.0, help="training minutes of every run (--budget)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("overrides", nargs="*", help="more dotted config overrides for every run")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.parallel < 1:
        parser.error("--minutes must be > 0 and --parallel >= 1")
    return args


def folders(args: argparse.Namespace) -> tuple[str, str]:
    """``--train`` / ``--test``, else the recipe's evaluation folders."""
    from ibot.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    return args.train or cfg.eval.train_path, args.test or cfg.eval.test_path


def teacher_file(run: Path) -> Path:
    file = run / "checkpoint.pt" if run.is_dir() else run
    if not file.is_file():
        raise BenchError(f"--teacher {run}: no checkpoint.pt there")
    return file.resolve()


def run_command(student: str, variant: str, seed: int, args: argparse.Namespace, teacher: Path, train: str, run: Path):
    command, extra = VARIANTS[variant]
    distill = [f"distill.teacher={teacher}", *extra] if command == "distill" else []
    overrides = [
        f"data.path={train}",
        f"train.seed={seed}",
        "train.threads=1",
        "eval.monitor_every_minutes=0",
        *STUDENTS[student],
        *distill,
        *args.overrides,
    ]
    return [sys.executable, "-m", "ibot", command, "--config", args.config, "--no-progress", "--output-dir", str(run),
            "--budget", f"{args.minutes:g}m", *overrides]  # fmt: skip


def knn_command(weights: Path, train: str, test: str, result: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ibot", "eval", "knn", str(weights), "--train-dir", train, "--test-dir", test,
            "--no-progress", "--json", str(result), *extra]  # fmt: skip


def knn_top1(result: Path) -> float:
    """k-NN top-1 % at k = 20 from ``ibot eval knn --json``."""
    knn = json.loads(result.read_text()).get("knn", {})
    if str(K) not in knn:
        raise BenchError(f"{result}: no k={K} result")
    return float(knn[str(K)]["top1"])


def last_step(run: Path) -> int:
    return max((row.get("step", 0) for row in read_metrics(run / "metrics.jsonl")), default=0)


def run_one(cmd: list[str], run: Path, train: str, test: str, settings: dict, dry_run: bool) -> tuple[float, int]:
    """(k-NN top-1 at k = 20, steps) of one run folder: read when scored, else trained and scored."""
    recorded = run / SETTINGS
    if recorded.exists() and json.loads(recorded.read_text()) != settings:
        raise BenchError(f"{run} was run with other settings (see {recorded}); use another --out")
    if (run / KNN).exists():
        return knn_top1(run / KNN), last_step(run)
    finished = (run / TRAINED).exists()  # written here once ibot exited 0 (its checkpoints say nothing of that)
    resume = not finished and any(run.glob("checkpoint*.pt"))
    if not finished and not resume and run.exists() and any(p.name != SETTINGS for p in run.iterdir()):
        raise BenchError(f"{run} holds an unfinished run without a checkpoint; remove the folder to rerun it")
    if dry_run:
        print("would run: " + shlex.join(cmd + (["--resume"] if resume else [])), flush=True)
        return float("nan"), 0
    run.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(settings, indent=1) + "\n")
    env = {**os.environ, "PYTHONPATH": _path(), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    with (run / "stdout.log").open("a") as log:
        if not finished:
            log.write(shlex.join(cmd) + "\n")
            log.flush()
            done = subprocess.run(cmd + (["--resume"] if resume else []), stdout=log, stderr=subprocess.STDOUT, env=env)
            if done.returncode != 0:
                raise BenchError(f"{run}: exited {done.returncode}; see {run / 'stdout.log'}")
            (run / TRAINED).touch()
        done = subprocess.run(knn_command(run, train, test, run / KNN), stdout=log, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            raise BenchError(f"{run}: ibot eval knn exited {done.returncode}; see {run / 'stdout.log'}")
    top1, steps = knn_top1(run / KNN), last_step(run)
    print(f"  {run}: {time.monotonic() - t0:.0f} s, {steps} steps, k-NN {top1:.2f} %", flush=True)
    return top1, steps


def score_folder(weights: Path, result: Path, train: str, test: str, dry_run: bool, *extra: str) -> float:
    """k-NN top-1 at k = 20 of ``weights`` (``extra``: ``--random-init``), kept in ``result``'s folder."""
    if dry_run or result.exists():
        return float("nan") if dry_run else knn_top1(result)
    result.parent.mkdir(parents=True, exist_ok=True)
    cmd = knn_command(weights, train, test, result, "--cache-dir", str(result.parent / "features"), *extra)
    env = {**os.environ, "PYTHONPATH": _path()}
    with (result.parent / "stdout.log").open("a") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
            raise BenchError(f"ibot eval knn {weights} failed; see {result.parent / 'stdout.log'}")
    return knn_top1(result)


def macs_per_image(overrides: list[str], args: argparse.Namespace) -> float:
    """Multiply-adds of one forward of the backbone the recipe plus ``overrides`` describe, on one
    eval-size image (millions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ibot.config import load_config
    from ibot.models.fit import run_backbone

    cfg = load_config(args.config, [*args.overrides, *overrides])
    model = run_backbone(cfg).eval()
    x = torch.zeros(1, cfg.data.channels, cfg.eval.image_size, cfg.eval.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e6


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    teacher = teacher_file(Path(args.teacher))
    digest = sha256(teacher)
    train, test = folders(args)
    jobs = []
    for student in args.students:
        for seed in args.seeds:
            for variant in args.variants:
                run = out / student / variant / f"seed{seed}"
                cmd = run_command(student, variant, seed, args, teacher, train, run)
                settings = {"command": cmd[3:], "teacher_sha256": digest, "test": test}
                jobs.append(((student, variant), cmd, run, settings))
    with ThreadPoolExecutor(args.parallel) as pool:
        teacher_top1 = score_folder(teacher.parent, out / "teacher" / KNN, train, test, args.dry_run)
        futures = [(key, pool.submit(run_one, cmd, run, train, test, settings, args.dry_run))
                   for key, cmd, run, settings in jobs]  # fmt: skip
        results: dict[tuple[str, str], list[tuple[float, int]]] = {}
        for key, future in futures:
            results.setdefault(key, []).append(future.result())
    if args.dry_run:
        return
    teacher_macs = macs_per_image(_teacher_overrides(teacher), args)
    lines = [
        f"k-NN top-1 % (k = {K}) on {test}, features of the whole {train}; {args.minutes:g} training minutes a run, "
        f"one thread each, {args.parallel} at a time; mean ± std over seeds {args.seeds}",
        "",
        "| student | MMAC / image (teacher / student) | variant | steps | k-NN top-1 (k=20) | per seed |",
        "|---|---|---|---|---|---|",
        f"| teacher ({teacher.parent.name}) | {teacher_macs:.1f} (1x) | — | — | {teacher_top1:.2f} | |",
    ]
    for student in args.students:  # its untrained architecture: the floor the runs start from
        first = next(run for key, _, run, _ in jobs if key[0] == student)
        top1 = score_folder(first, out / student / "random_init" / KNN, train, test, False, "--random-init")
        lines.append(f"| {student} | | random init | 0 | {top1:.2f} | |")
    for (student, variant), rows in results.items():
        macs = macs_per_image(STUDENTS[student], args)
        top1 = [r[0] for r in rows]
        steps = statistics.mean(r[1] for r in rows)
        cells = [student, f"{macs:.1f} ({teacher_macs / macs:.1f}x)", variant, f"{steps:.0f}", mean_std(top1),
                 " / ".join(f"{v:.2f}" for v in top1)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print()
    print(text)
    (out / "table.md").write_text(text + "\n")


def _teacher_overrides(teacher: Path) -> list[str]:
    """The teacher run's own model section, as overrides of the recipe."""
    import yaml

    model = yaml.safe_load((teacher.parent / "config.yaml").read_text())["model"]
    return [f"model.{key}={value}" for key, value in model.items() if key in ("arch", "depth", "patch_size", "stem")]


if __name__ == "__main__":
    main()
