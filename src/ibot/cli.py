"""The ``ibot`` command: pretrain, distill, submit, eval (knn, probe, robustness, dense, finetune, retrieval, cluster,
lowshot), embed, retrieve, export, ablate, visualize, stats, report, demo.

Config path + dotted overrides, few flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from ibot.errors import IBOTError

logger = logging.getLogger("ibot")


def parse_duration_minutes(text: str) -> float:
    """``90s``, ``45m``, ``1.5h`` or a bare number of minutes -> minutes (argparse type of --budget)."""
    units = {"s": 1 / 60, "m": 1.0, "h": 60.0}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "m")
    try:
        minutes = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 60m or 1.5h") from None
    if minutes <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be positive")
    return minutes


def positive_int(text: str) -> int:
    """argparse type of counts that must be at least 1 (``visualize --count``, ``--clusters``, ``--pairs``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _pretrain_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The Config of ``ibot pretrain`` / ``ibot submit``: file, overrides, then --output-dir and --budget."""
    from ibot.config import load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.budget:
        overrides.append(f"train.budget_minutes={args.budget}")
    return load_config(args.config, overrides)


def _check_distill(cfg, command: str) -> None:  # type: ignore[no-untyped-def]
    """``ibot distill`` needs ``distill.teacher``; ``ibot pretrain`` points a config that sets it there."""
    from ibot.errors import ConfigError

    if command == "distill" and not cfg.distill.teacher:
        raise ConfigError("distill.teacher: ibot distill needs the teacher's weights (distill.teacher=PATH)")
    if command == "pretrain" and cfg.distill.teacher:
        raise ConfigError(
            f"distill.teacher is set ({cfg.distill.teacher}): distil with `ibot distill`, or unset it to pre-train"
        )


def _cmd_pretrain(args: argparse.Namespace) -> int:
    """``ibot pretrain`` and ``ibot distill`` (the same run, with a frozen teacher read from a file)."""
    from ibot.eval.monitor import KNNMonitor
    from ibot.train.loop import train

    cfg = _pretrain_config(args)
    _check_distill(cfg, args.command)
    result = train(cfg, resume=args.resume, progress=not args.no_progress, monitor=KNNMonitor)
    if result.already_finished:
        logger.info("already finished at step %d; weights in %s", result.step, result.output_dir)
        return 0
    if result.stopped_by:
        logger.info(
            "stopped by %s at step %d/%d; checkpoint in %s. Resume with: %s",
            result.stopped_by,
            result.step,
            result.total_steps,
            result.output_dir,
            _resume_command(args),
        )
        return 0
    logger.info(
        "done: step %d/%d, loss %.4f, %.1f images/s, weights in %s",
        result.step,
        result.total_steps,
        result.last_loss,
        result.images_per_second,
        result.output_dir,
    )
    if result.knn_top1 is not None:
        logger.info(
            "k-NN monitor (k=%d): top-1 %.2f %% after %.1f training minutes",
            cfg.eval.monitor_k,
            result.knn_top1,
            result.train_minutes,
        )
    return 0  # the trainer has reported the skipped files (one line, RUN/skipped.tsv)


def _resume_command(args: argparse.Namespace) -> str:
    """The ``ibot pretrain`` (``ibot distill``) command line that continues this run."""
    words = ["ibot", args.command, "--config", args.config]
    if args.output_dir:
        words += ["--output-dir", args.output_dir]
    if args.budget:
        words += ["--budget", f"{args.budget:g}m"]
    return shlex.join([*words, *args.overrides, "--resume"])


def _cmd_submit(args: argparse.Namespace) -> int:
    from ibot.submit import SlurmConfig, submit

    cfg = _pretrain_config(args)
    slurm = SlurmConfig(
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node or max(args.gpus_per_node, 1),
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        timeout_min=args.timeout_min,
        partition=args.partition,
    )
    job = submit(cfg, slurm, args.slurm_folder, local=args.local)
    logger.info(
        "submitted job %s (%d x %d tasks): logs in %s", job.job_id, slurm.nodes, slurm.tasks_per_node, job.paths.folder
    )
    if args.wait:
        result = job.results()[0]  # rank 0's RunResult
        if result.already_finished:
            logger.info("already finished at step %d; weights in %s", result.step, result.output_dir)
        else:
            logger.info("done: step %d/%d, weights in %s", result.step, result.total_steps, result.output_dir)
    return 0


def _save_result(args: argparse.Namespace, command: str, result: dict) -> None:
    """Keep ``result`` in the run's eval folder (for ``ibot report``), and at ``--json`` if given."""
    from ibot.run_folder import RunFolder
    from ibot.tracking import send_to_run

    text = json.dumps(result, indent=2)
    path = RunFolder.of(args.weights).eval_result(command, args.random_init)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    send_to_run(RunFolder.of(args.weights), lambda t: t.log_result(path.stem, path, result))


def _cmd_eval(args: argparse.Namespace) -> int:
    """``ibot eval <command>``: the registry's run, its table, its JSON in the run folder
    (whose lock it holds: it writes RUN/eval and RUN/features)."""
    from ibot.eval.commands import COMMANDS, EvalRequest
    from ibot.run_folder import RunFolder

    command = COMMANDS[args.eval_command]
    request = EvalRequest(
        args.weights,
        args.train_dir,
        args.test_dir,
        args.random_init,
        tuple(args.overrides),
        args.cache_dir,
        progress=not args.no_progress,
    )
    with RunFolder.of(args.weights).lock(f"ibot eval {command.name}"):
        report = command.run(request)
        print(command.format(report))
        _save_result(args, command.name, report.as_dict())
    return 0


# --- ibot embed / ibot retrieve / ibot eval retrieval -----------------------------------------------
def _cmd_embed(args: argparse.Namespace) -> int:
    from ibot.eval.embed import EmbedRequest, format_embed, run_embed

    request = EmbedRequest(
        args.weights,
        args.images,
        args.out,
        pool=args.pool,
        batch_size=args.batch_size,
        force=args.force,
        random_init=args.random_init,
        overrides=tuple(args.overrides),
        progress=not args.no_progress,
    )
    print(format_embed(run_embed(request)))
    return 0


def _cmd_retrieve(args: argparse.Namespace) -> int:
    from ibot.eval.retrieve import RetrieveRequest, format_retrieve, run_retrieve

    # --query takes every word after it: dotted overrides there (key=value, not a file) are overrides.
    overrides = [q for q in args.query if "=" in q and not Path(q).exists()]
    request = RetrieveRequest(
        args.weights,
        args.index,
        tuple(q for q in args.query if q not in overrides),
        k=args.k,
        out_dir=args.out,
        overrides=(*args.overrides, *overrides),
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    print(format_retrieve(run_retrieve(request)))
    return 0


def _add_eval_commands(sub) -> None:  # type: ignore[no-untyped-def]
    """``ibot eval <command>``, one sub-command per entry of the registry (``ibot.eval.commands.COMMANDS``)."""
    from ibot.eval.commands import COMMANDS

    e = sub.add_parser("eval", help="evaluate frozen features")
    esub = e.add_subparsers(dest="eval_command", required=True)
    for command in COMMANDS.values():
        cmd = esub.add_parser(command.name, help=command.help)
        cmd.add_argument("weights", help="a run folder, its teacher.safetensors, or a timm/DINO/iBOT ViT state dict")
        cmd.add_argument("--train-dir", default="", help="labelled image folder to fit on")
        cmd.add_argument("--test-dir", default="", help="labelled image folder to classify")
        cmd.add_argument("--random-init", action="store_true", help="same architecture, untrained weights")
        cmd.add_argument(
            "--cache-dir",
            default="",
            help="feature cache of every command but dense and finetune (default: RUN/features)",
        )
        cmd.add_argument("--json", help="also write the results here")
        cmd.add_argument("--no-progress", action="store_true")
        cmd.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. eval.batch_size=512")
        cmd.set_defaults(func=_cmd_eval)


def _add_embed_commands(sub) -> None:  # type: ignore[no-untyped-def]
    """``ibot embed`` and ``ibot retrieve``."""
    m = sub.add_parser("embed", help="one embedding per image of a folder, to .parquet or .npy")
    m.add_argument("weights", help="a run folder, its teacher.safetensors, or a timm/DINO/iBOT ViT state dict")
    m.add_argument("--images", required=True, help="image folder (class sub-folders give labels)")
    m.add_argument("--out", required=True, help="FILE.parquet (pip install 'ibot[embed]') or FILE.npy")
    m.add_argument(
        "--pool",
        choices=("cls", "mean", "patch"),
        default="cls",
        help="[cls], the mean of the patch tokens, or the patch tokens: (images, h, w, D) float16, .npy only",
    )
    m.add_argument("--batch-size", type=int, default=0, help="images per forward (default: eval.batch_size)")
    m.add_argument("--force", action="store_true", help="overwrite an existing output")
    m.add_argument("--random-init", action="store_true", help="same architecture, untrained weights")
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.device=cpu")
    m.set_defaults(func=_cmd_embed)

    q = sub.add_parser("retrieve", help="the top-k images of an index folder for query images, and a contact sheet")
    q.add_argument("weights", help="a run folder, its teacher.safetensors, or a timm/DINO/iBOT ViT state dict")
    q.add_argument("--index", required=True, help="image folder to search (its features are cached)")
    q.add_argument("--query", required=True, nargs="+", help="query image files or folders")
    q.add_argument("--k", type=int, default=5, help="results per query")
    q.add_argument("--out", default="", help="folder of retrieval.html / .json (default: RUN/retrieval)")
    q.add_argument("--cache-dir", default="", help="feature cache of the index folder (default: RUN/features)")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. eval.retrieval_flat_max=0")
    q.set_defaults(func=_cmd_retrieve)


def _cmd_stats(args: argparse.Namespace) -> int:
    """``ibot stats DIR``: per-channel mean / std of a seeded sample, printed and (``--out``) kept as a snippet."""
    from ibot.config import load_config
    from ibot.data.stats import channel_stats

    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.force:
        raise IBOTError(f"--out {out}: exists (--force replaces it)")
    # What it measures is data.mean / data.std: whatever they hold now (3 values with channels=5) is moot.
    cfg = load_config(args.config, [*args.overrides, "data.mean=auto", "data.std=auto"])
    stats = channel_stats(args.folder, cfg.data, args.images, args.seed, cfg.data.num_workers)
    rows = [f"| {c} | {m:.4f} | {s:.4f} |" for c, (m, s) in enumerate(zip(stats.mean, stats.std))]
    head = f"| channel ({stats.images} images, seed {args.seed}, data.intensity={cfg.data.intensity}) | mean | std |"
    print("\n".join([head, "|---|---|---|", *rows]))
    if stats.skips:
        from ibot.data.skips import SkipLog

        print(SkipLog(stats.skips).summary("stats"))
    print(stats.config_snippet())
    if out is not None:
        from ibot.storage import atomic_write

        atomic_write(out, lambda tmp: Path(tmp).write_text(stats.config_snippet() + "\n"))
        print(f"wrote {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ibot.report import write_report

    md, page = write_report(args.run_dir)
    print(f"wrote {md} and {page}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from ibot.ablate import format_ablation, load_variants, run_ablation

    variants = load_variants(args.variants)
    rows = run_ablation(
        args.config,
        list(args.overrides),
        variants,
        args.seeds,
        args.budget,
        args.output_dir,
        patch_probe=not args.no_patch_probe,
        progress=not args.no_progress,
    )
    print(format_ablation(rows, list(variants)))
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    """``ibot visualize KIND``: holds the run folder's lock when the picture goes into it (the default)."""
    from ibot import visualize
    from ibot.run_folder import RunFolder

    run = RunFolder.of(args.weights)
    path = visualize.picture_path(args.output, args.kind, run.pictures)
    with run.lock(f"ibot visualize {args.kind}") if run.contains(path.parent) else contextlib.nullcontext():
        _visualize(args, path)
    return 0


def _visualize(args: argparse.Namespace, path: Path) -> None:
    from ibot import visualize
    from ibot.data.display import drawn_channels
    from ibot.data.skips import SkipLog, report_skips
    from ibot.eval.features import load_frozen
    from ibot.run_folder import RunFolder
    from ibot.tracking import send_to_run

    frozen = load_frozen(args.weights, on_cpu=True)
    backbone, cfg = frozen.backbone, frozen.cfg
    cfg = visualize.at_size(cfg, args.size)
    channels = drawn_channels(args.channels, cfg.data.channels)
    folder = visualize.image_folder(args.images, cfg)
    skips = SkipLog()
    images = visualize.spread_images(folder, cfg, 2 if args.kind == "correspondences" else args.count, skips)
    if args.kind == "attention":
        written = visualize.draw_attention(backbone, images, cfg, path, channels)
    elif args.kind == "clusters":
        written = visualize.draw_clusters(backbone, images, cfg, path, args.clusters, channels)
    elif args.kind == "pca":
        written = visualize.draw_pca(backbone, images, cfg, path, args.threshold, channels)
    else:
        written = visualize.draw_correspondences(backbone, images, cfg, path, args.pairs, channels)
    # Only beside a picture drawn: a refused command leaves the run folder as it was.
    report_skips(skips, f"visualize {args.kind}", path.parent / f"skipped-{args.kind}.tsv")
    logger.info("wrote %s", written)
    run = RunFolder.of(args.weights)
    if run.contains(written):  # a picture of the run, in its folder: to its trackers too
        send_to_run(run, lambda t: t.log_image(args.kind, written))


def _cmd_demo(args: argparse.Namespace) -> int:
    from ibot.config import load_config
    from ibot.demo import REPORT_K, own_folder_commands, run_demo, verdict

    start = time.monotonic()
    cfg = load_config(args.config, list(args.overrides))
    if args.seeds < 1 or args.init_seeds < 1:
        raise IBOTError("--seeds and --init-seeds must be >= 1")
    result = run_demo(cfg, seeds=args.seeds, init_seeds=args.init_seeds, progress=not args.no_progress)
    k = REPORT_K if REPORT_K in cfg.eval.knn_k else cfg.eval.knn_k[0]
    print(result.table)
    print()
    print(verdict(result.teacher, result.random_init, k))
    print(
        f"time: {(time.monotonic() - start) / 60:.1f} min "
        f"(pre-training {result.train_minutes:.1f}, k-NN {result.eval_minutes:.1f})"
    )
    print(f"k-NN table: {result.knn_table}")
    print(f"report: {result.report[0]} and {result.report[1]}")
    print(f"attention picture: {result.attention}")
    print("\nThe same on your own images (DIR: an image folder; TRAIN_DIR, TEST_DIR: labelled class sub-folders):")
    for command in own_folder_commands(args.config):
        print(f"  {command}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ibot.export import export

    done = export(args.run, args.format, args.out, force=args.force)
    note = f"; {done.note}" if done.note else ""
    print(f"wrote {done.folder}: {', '.join(done.files)} ({done.seconds:.1f} s{note})")
    print(f"check: max abs diff {done.max_abs_diff:.2e} to the ibot backbone (tolerance {done.tolerance:.0e})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ibot", description="iBOT pre-training and frozen-feature evaluation")
    sub = parser.add_subparsers(dest="command", required=True)

    def pretrain_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="YAML file of config deltas")
        p.add_argument("--output-dir", help="same as train.output_dir=...")
        p.add_argument(
            "--budget",
            type=parse_duration_minutes,
            help="training time (e.g. 60m, 1.5h): schedules span it instead of optim.epochs; "
            "same as train.budget_minutes=...",
        )
        p.add_argument("overrides", nargs="*", help="dotted.key=value")

    p = sub.add_parser("pretrain", help="pre-train a ViT with iBOT")
    pretrain_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from the output dir's latest checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("distill", help="distil a frozen teacher (distill.teacher=PATH) into a smaller ViT or timm CNN")
    pretrain_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from the output dir's latest checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_pretrain)

    s = sub.add_parser("submit", help="pre-train as a SLURM job through submitit (requeued and resumed on timeout)")
    pretrain_arguments(s)
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument("--tasks-per-node", type=int, default=0, help="processes per node (default: one per GPU)")
    s.add_argument("--cpus-per-task", type=int, default=10)
    s.add_argument("--mem-gb", type=int, default=0, help="memory per node (default: the partition's)")
    s.add_argument("--timeout-min", type=int, default=24 * 60)
    s.add_argument("--partition", default="")
    s.add_argument("--slurm-folder", help="submitit's logs and pickles (default: OUTPUT_DIR/slurm)")
    s.add_argument("--local", action="store_true", help="run the job on this machine (submitit's local executor)")
    s.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    s.set_defaults(func=_cmd_submit)

    _add_eval_commands(sub)
    _add_embed_commands(sub)

    t = sub.add_parser("stats", help="per-channel mean and std of an image folder (data.mean / data.std)")
    t.add_argument("folder", help="image folder (class sub-folders or not)")
    t.add_argument("--config", default=None, help="YAML file of config deltas (data.format, data.max_image_pixels)")
    t.add_argument("--images", type=positive_int, default=1000, help="images to read, a seeded sample")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="", help="also write the data.mean / data.std snippet here (YAML)")
    t.add_argument("--force", action="store_true", help="replace an existing --out")
    t.add_argument("overrides", nargs="*", help="dotted.key=value")
    t.set_defaults(func=_cmd_stats)

    r = sub.add_parser("report", help="one page (Markdown + HTML + PNG) from a run's metrics and evaluations")
    r.add_argument("run_dir", help="a pre-training output folder")
    r.set_defaults(func=_cmd_report)

    a = sub.add_parser("ablate", help="variants x seeds under one budget: k-NN, patch probe, collapse monitors")
    a.add_argument("--config", help="YAML file of config deltas shared by every variant")
    a.add_argument("--variants", required=True, help="YAML file: variants: {name: [dotted overrides]}")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--budget", type=parse_duration_minutes, required=True, help="training time per run, e.g. 5m")
    a.add_argument("--output-dir", default="runs/ablate")
    a.add_argument("--no-patch-probe", action="store_true", help="k-NN and monitors only")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("overrides", nargs="*", help="dotted.key=value for every variant")
    a.set_defaults(func=_cmd_ablate)

    v = sub.add_parser(
        "visualize", help="PNG pictures: [cls] attention per head, patch clusters, correspondences, patch PCA"
    )
    v.add_argument("kind", choices=("attention", "clusters", "correspondences", "pca"))
    v.add_argument("weights", help="a run folder, its teacher.safetensors, or a timm/DINO/iBOT ViT state dict")
    v.add_argument("--images", default="", help="image folder (default: the run's eval.test_path)")
    v.add_argument("--count", type=positive_int, default=8, help="images to draw (spread over the folder)")
    v.add_argument("--clusters", type=positive_int, default=8, help="k of the patch-token k-means")
    v.add_argument("--pairs", type=positive_int, default=12, help="correspondence lines to draw")
    v.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="pca: foreground = first component (scaled to [0, 1]) above this; background black, "
        "components re-fitted on the foreground",
    )
    v.add_argument(
        "--size",
        type=int,
        default=0,
        help="image side to draw at (a multiple of the patch size, at most 64 patches; default eval size)",
    )
    v.add_argument("--output", default="", help="PNG path, or a folder for KIND.png (default: RUN/pictures/KIND.png)")
    v.add_argument(
        "--channels",
        default="",
        help="image channels drawn as RGB, e.g. 0,1,2; one index is drawn grey (default: the first 3, or grey)",
    )
    v.set_defaults(func=_cmd_visualize)

    d = sub.add_parser("demo", help="pre-train on the embedded CIFAR-10 sample, then k-NN vs random init")
    d.add_argument("--config", default="configs/demo.yaml")
    d.add_argument("--seeds", type=int, default=1, help="pre-training seeds (train.seed, +1, ...): mean +/- std")
    d.add_argument("--init-seeds", type=int, default=3, help="random inits to score (cheap: no training)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(func=_cmd_demo)

    x = sub.add_parser("export", help="the backbone as a timm folder, a transformers ViTModel folder or ONNX, checked")
    x.add_argument("run", help="a run folder, its teacher.safetensors, or a timm/DINO/iBOT ViT state dict")
    x.add_argument("--format", required=True, choices=("timm", "hf", "onnx"), help="see docs/export.md")
    x.add_argument("--out", required=True, help="folder to write (new or empty)")
    x.add_argument("--force", action="store_true", help="replace --out when an earlier ibot export wrote it")
    x.set_defaults(func=_cmd_export)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; dotted overrides may come before or after options."""
    parser = build_parser()
    # argparse fills the positional list once, before the first option: collect the rest here.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def _let_waiting_threads_sleep() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set: read once by libgomp when torch loads, so before any command imports it.

    By default a torch intra-op thread that waits at the end of a parallel region spins first
    (GOMP_SPINCOUNT 300,000). When another process needs one of the cores, the spinning holds
    it: on this project's 2-core CPU, next to other processes, the demo pre-trained at 15-28
    images/s against 65-139 with passive waits, which were never slower (benchmarks/threads.py,
    docs/input.md). Passive threads sleep at once.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    _let_waiting_threads_sleep()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        return int(args.func(args))
    except IBOTError as exc:
        print(f"ibot: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ibot: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
