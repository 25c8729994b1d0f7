"""Continue pre-training from a backbone with fresh heads: does k-NN keep what the backbone knew?

Measures what ``optim.freeze_backbone_epochs`` and ``optim.backbone_lr_scale`` are for (issue:
users of DINOv2 see k-NN fall from 80 % to 10 % when they continue pre-training with fresh
heads). A backbone-only file (a run's ``teacher.safetensors``: fresh heads) is pre-trained
further on another domain's train folder for ``--steps`` steps, the k-NN monitor scoring the
teacher on that domain's test folder at step 0 and every ``--monitor-every`` steps, for each
variant and seed:

- ``fresh``: fresh heads as before the protection (``freeze_backbone_epochs=0``, lr scale 1);
- ``freeze``: the backbones frozen for ``--freeze-steps`` steps while the heads learn;
- ``lrscale``: the backbone's learning rate times ``--lr-scale`` for the whole run;
- ``both``: the two together;
- ``auto``: what a user gets by default (``freeze_backbone_epochs=-1``: auto);
- ``heads``: the control: the source run's checkpoint, its trained heads included (``--backbone``
  must be a run folder), as ``fresh`` otherwise: a drop here is not the fresh heads' doing.

    python benchmarks/continue_pretraining.py --backbone runs/teacher --train runs/domain/png16_train \\
        --test runs/domain/png16_test --out runs/continue --steps 600 --monitor-every 50

Every run is an ``ibot pretrain`` subprocess in ``--out/<variant>/seed<N>``; its learning-rate
schedule spans ``--schedule-steps`` (default ``--steps``: warm-up, then the cosine to
``optim.min_lr``). The script can be stopped and started again: a finished run is read, not
rerun, and an unfinished one resumes from its checkpoint (bit-exact). The backbone is copied to
``--out/backbone.safetensors`` once, so that a source run still training cannot change it
between runs; a run folder made with other settings, or a source that changed since the copy,
is refused with one line rather than mixed into the table.

Prints a Markdown table: per variant, k-NN top-1 at step 0 and at each monitor step (mean ± std
over seeds), the lowest value after step 0 minus step 0, and the end minus step 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fresh", "freeze", "lrscale", "both", "auto", "heads")
BACKBONE_COPY = "backbone.safetensors"
HEADS_COPY = "heads-checkpoint.pt"  # the control's source: backbones and heads
SETTINGS = "continue_pretraining.json"  # in each run folder: what it was run with


class BenchError(SystemExit):
    """A one-line refusal (exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"continue_pretraining: error: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, help="a run folder (its teacher.safetensors) or a weights file")
    parser.add_argument("--train", required=True, help="labelled train folder of the new domain (data and k-NN)")
    parser.add_argument("--test", required=True, help="labelled test folder of the new domain (k-NN)")
    parser.add_argument("--out", required=True, help="one run folder per variant and seed goes here")
    parser.add_argument("--config", default=str(ROOT / "configs" / "cifar10.yaml"), help="the recipe")
    parser.add_argument("--variants", nargs="+", default=["fresh", "freeze", "lrscale", "both"], choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed of each repeat")
    parser.add_argument("--steps", type=int, default=600, help="steps per run (train.max_steps)")
    parser.add_argument("--schedule-steps", type=int, default=0, help="steps the lr schedule spans (0: --steps)")
    parser.add_argument("--monitor-every", type=int, default=50, help="k-NN every so many steps (and at 0 and the end)")
    parser.add_argument("--freeze-steps", type=int, default=300, help="the freeze of 'freeze' and 'both'")
    parser.add_argument("--lr-scale", type=float, default=0.1, help="the backbone lr scale of 'lrscale' and 'both'")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("overrides", nargs="*", help="more dotted config overrides for every run")
    args = parser.parse_args(argv)
    args.schedule_steps = args.schedule_steps or args.steps
    for name in ("steps", "monitor_every", "schedule_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.freeze_steps < 0 or args.lr_scale <= 0:
        parser.error("--freeze-steps must be >= 0 and --lr-scale > 0")
    return args


def backbone_file(path: Path, heads: bool = False) -> Path:
    """The weights file of ``--backbone``: a run folder's teacher.safetensors (the backbone alone), or the
    file; with ``heads``, the run folder's checkpoint.pt (backbones and heads, for the ``heads`` control)."""
    if heads and not path.is_dir():
        raise BenchError(f"--backbone {path}: the 'heads' variant needs a run folder (its checkpoint.pt)")
    file = (path / ("checkpoint.pt" if heads else "teacher.safetensors")) if path.is_dir() else path
    if not file.is_file():
        raise BenchError(f"--backbone {path}: no {file.name} there")
    return file.resolve()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot_backbone(source: Path, out: Path, name: str = BACKBONE_COPY) -> Path:
    """``source`` copied to ``out/name`` once (its digest beside it); later calls check it did not change."""
    copy, digest_file = out / name, out / f"{name}.source.json"
    digest = sha256(source)
    if copy.exists():
        recorded = json.loads(digest_file.read_text()) if digest_file.exists() else {}
        if recorded.get("sha256") != digest:
            raise BenchError(f"{source} is not the backbone the runs in {out} started from ({copy}); use another --out")
        return copy
    out.mkdir(parents=True, exist_ok=True)
    partial = copy.with_suffix(".partial")
    shutil.copyfile(source, partial)
    if sha256(partial) != digest:
        raise BenchError(f"{source} changed while it was copied (a run still writing it?); try again")
    digest_file.write_text(json.dumps({"source": str(source), "sha256": digest}) + "\n")
    partial.replace(copy)
    return copy


def steps_per_epoch(args: argparse.Namespace) -> int:
    """The recipe's steps per epoch over ``--train`` (the run's own plan: files listed // batch)."""
    sys.path.insert(0, str(ROOT / "src"))
    from ibot.config import RunPlan, load_config
    from ibot.data.loaders import listed_images

    cfg = load_config(args.config, [*args.overrides, f"data.path={args.train}"])
    return RunPlan.derive(cfg, listed_images(cfg.data)).steps_per_epoch


def variant_overrides(variant: str, args: argparse.Namespace, per_epoch: int) -> list[str]:
    """The overrides that make ``variant``; steps become epochs of the run's plan."""
    freeze = f"optim.freeze_backbone_epochs={args.freeze_steps / per_epoch!r}"
    scale = f"optim.backbone_lr_scale={args.lr_scale!r}"
    return {
        "fresh": ["optim.freeze_backbone_epochs=0", "optim.backbone_lr_scale=1.0"],
        "freeze": [freeze, "optim.backbone_lr_scale=1.0"],
        "lrscale": ["optim.freeze_backbone_epochs=0", scale],
        "both": [freeze, scale],
        "auto": ["optim.freeze_backbone_epochs=-1", "optim.backbone_lr_scale=1.0"],
        "heads": ["optim.freeze_backbone_epochs=0", "optim.backbone_lr_scale=1.0"],
    }[variant]


def run_overrides(variant: str, seed: int, args: argparse.Namespace, source: Path, per_epoch: int) -> list[str]:
    """Every override of one run: the recipe's, the measurement's, the variant's, then ``overrides``;
    ``source`` is the snapshot ``model.init_from`` reads."""
    # ceil(epochs * steps per epoch) = schedule_steps exactly: half a step below it.
    epochs = (args.schedule_steps - 0.5) / per_epoch
    return [
        f"data.path={args.train}",
        f"eval.train_path={args.train}",
        f"eval.test_path={args.test}",
        f"model.init_from={source}",
        f"train.seed={seed}",
        f"optim.epochs={epochs!r}",
        "train.budget_minutes=0",
        f"train.max_steps={args.steps}",
        "eval.monitor_every_minutes=0",
        f"eval.monitor_every_steps={args.monitor_every}",
        f"train.checkpoint_every={args.monitor_every}",  # a stopped run loses at most that much
        *variant_overrides(variant, args, per_epoch),
        *args.overrides,
    ]


def knn_curve(run: Path) -> dict[int, float]:
    """{step: k-NN top-1 %} of a run folder's metrics ({} without any)."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return {}
    curve = {}
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: the resume rewrites it
        if isinstance(row, dict) and "knn_top1" in row:
            curve[int(row["step"])] = float(row["knn_top1"])
    return curve


def run_one(run: Path, config: str, overrides: list[str], steps: int, dry_run: bool) -> dict[int, float]:
    """The run's k-NN curve: read when finished, else trained (resumed when it has a checkpoint)."""
    settings = {"config": config, "overrides": overrides}
    recorded = run / SETTINGS
    if recorded.exists() and json.loads(recorded.read_text()) != settings:
        raise BenchError(f"{run} was run with other settings (see {recorded}); use another --out")
    curve = knn_curve(run)
    if steps in curve:
        return curve
    resume = any(run.glob("checkpoint*.pt"))
    if not resume and run.exists() and any(p.name != SETTINGS for p in run.iterdir()):
        raise BenchError(f"{run} holds an unfinished run without a checkpoint; remove the folder to rerun it")
    cmd = [sys.executable, "-m", "ibot", "pretrain", "--config", config, "--no-progress", "--output-dir", str(run)]
    cmd += [*overrides, *(["--resume"] if resume else [])]
    print(("would run: " if dry_run else "") + shlex.join(cmd), flush=True)
    if dry_run:
        return {}
    run.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(settings, indent=1) + "\n")
    t0 = time.monotonic()
    with (run / "stdout.log").open("a") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": _path()})
    if done.returncode != 0:
        raise BenchError(f"{run}: ibot pretrain exited {done.returncode}; see {run / 'stdout.log'}")
    curve = knn_curve(run)
    if steps not in curve:
        raise BenchError(f"{run}: no k-NN at step {steps} in its metrics.jsonl (stopped early?)")
    print(f"  {run}: {time.monotonic() - t0:.0f} s, k-NN {curve[0]:.2f} -> {curve[steps]:.2f} %", flush=True)
    return curve


def _path() -> str:
    """PYTHONPATH for the subprocesses: this checkout's ``src`` first."""
    return os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(curves: dict[str, list[dict[int, float]]]) -> str:
    """Markdown: per variant, k-NN (mean ± std over seeds) at each step every run monitored, the lowest
    after step 0 minus step 0, and the end minus step 0 (each a per-seed difference, then mean ± std)."""
    steps = sorted(set.intersection(*(set(c) for runs in curves.values() for c in runs)))
    end = steps[-1]
    head = ["variant", "seeds", *[f"step {s}" for s in steps], "min after 0 − step 0", "end − step 0"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, runs in curves.items():
        cells = [variant, str(len(runs))]
        cells += [mean_std([c[s] for c in runs]) for s in steps]
        cells.append(mean_std([min(c[s] for s in steps if s > 0) - c[0] for c in runs]))
        cells.append(mean_std([c[end] - c[0] for c in runs]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    source = backbone_file(Path(args.backbone))
    backbone = out / BACKBONE_COPY if args.dry_run else snapshot_backbone(source, out)
    sources = {variant: backbone for variant in args.variants}
    if "heads" in args.variants:
        checkpoint = backbone_file(Path(args.backbone), heads=True)
        sources["heads"] = out / HEADS_COPY if args.dry_run else snapshot_backbone(checkpoint, out, HEADS_COPY)
    per_epoch = steps_per_epoch(args)
    print(
        f"# {args.config}, {args.steps} steps ({args.schedule_steps} scheduled, {per_epoch} per epoch), "
        f"k-NN every {args.monitor_every}; backbone {source}",
        flush=True,
    )
    curves: dict[str, list[dict[int, float]]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            overrides = run_overrides(variant, seed, args, sources[variant], per_epoch)
            curve = run_one(out / variant / f"seed{seed}", args.config, overrides, args.steps, args.dry_run)
            curves.setdefault(variant, []).append(curve)
    if args.dry_run:
        return
    text = table(curves)
    print()
    print(f"k-NN top-1 % (eval.monitor_k) on {args.test}; mean ± std over seeds {args.seeds}")
    print(text)
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
