"""The ``ibot`` command: pretrain, eval knn, demo. Config path + dotted overrides, few flags."""

from __future__ import annotations

import argparse
import json
import logging
import sys
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


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ibot.config import load_config
    from ibot.train.loop import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.budget:
        overrides.append(f"train.budget_minutes={args.budget}")
    cfg = load_config(args.config, overrides)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
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
    if result.skipped_images:
        logger.info("skipped %d unreadable images", result.skipped_images)
    return 0


def run_knn(
    weights: str, train_dir: str, test_dir: str, random_init: bool, overrides: list[str], progress: bool = True
) -> dict:
    """k-NN of the frozen backbone at ``weights``: {"weights", "train_images", ..., "knn": {k: {"top1", "top5"}}}."""
    import torch

    from ibot.config import config_from_dict
    from ibot.eval.features import extract_features, load_frozen_backbone
    from ibot.eval.knn import knn_classify
    from ibot.train.runtime import Runtime

    backbone, cfg = load_frozen_backbone(weights, random_init=random_init)
    cfg = config_from_dict(cfg.to_dict(), overrides)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    runtime = Runtime.resolve(cfg.train)
    train_dir = train_dir or cfg.eval.train_path
    test_dir = test_dir or cfg.eval.test_path
    if not train_dir or not test_dir:
        raise IBOTError("eval knn: give --train-dir and --test-dir (or eval.train_path / eval.test_path)")
    train_f = extract_features(backbone, train_dir, cfg, runtime, progress=progress)
    test_f = extract_features(backbone, test_dir, cfg, runtime, progress=progress)
    for folder, feats in ((train_dir, train_f), (test_dir, test_f)):
        if bool((feats.labels < 0).any()):
            raise IBOTError(f"{folder}: k-NN needs labelled images, one sub-folder per class")
    results = knn_classify(
        train_f.cls, train_f.labels, test_f.cls, test_f.labels, cfg.eval.knn_k, cfg.eval.knn_temperature
    )
    return {
        "weights": "random-init" if random_init else str(weights),
        "train_images": int(train_f.labels.numel()),
        "test_images": int(test_f.labels.numel()),
        "skipped_images": train_f.skipped + test_f.skipped,
        "knn": {k: {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()},
    }


def format_knn(results: list[dict]) -> str:
    ks = list(results[0]["knn"])
    head = "| weights | " + " | ".join(f"k={k} top-1 / top-5" for k in ks) + " |"
    rule = "|---|" + "---|" * len(ks)
    rows = [
        f"| {r['weights']} | " + " | ".join(f"{r['knn'][k]['top1']:.2f} / {r['knn'][k]['top5']:.2f}" for k in ks) + " |"
        for r in results
    ]
    return "\n".join([head, rule, *rows])


def _cmd_knn(args: argparse.Namespace) -> int:
    results = [
        run_knn(args.weights, args.train_dir, args.test_dir, args.random_init, args.overrides, not args.no_progress)
    ]
    print(format_knn(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ibot.config import load_config
    from ibot.train.loop import train

    cfg = load_config(args.config, list(args.overrides))
    logger.info("demo: iBOT pre-training on %s for %s epochs", cfg.data.path, cfg.optim.epochs)
    result = train(cfg, resume=False, progress=not args.no_progress)
    logger.info("pre-training: %d steps, %.1f images/s", result.step, result.images_per_second)
    weights = str(Path(cfg.train.output_dir))
    results = [run_knn(weights, "", "", random_init, [], not args.no_progress) for random_init in (False, True)]
    results[0]["weights"] = f"iBOT teacher ({weights})"
    results[1]["weights"] = "random init, same shape"
    table = format_knn(results)
    (Path(cfg.train.output_dir) / "knn.md").write_text(table + "\n")
    print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ibot", description="iBOT pre-training and frozen-feature evaluation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train a ViT with iBOT")
    p.add_argument("--config", required=True, help="YAML file of config deltas")
    p.add_argument("--output-dir", help="same as train.output_dir=...")
    p.add_argument("--resume", action="store_true", help="continue from the output dir's latest checkpoint")
    p.add_argument(
        "--budget",
        type=parse_duration_minutes,
        help="training time (e.g. 60m, 1.5h): schedules span it instead of optim.epochs; "
        "same as train.budget_minutes=...",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.set_defaults(func=_cmd_pretrain)

    e = sub.add_parser("eval", help="evaluate frozen features")
    esub = e.add_subparsers(dest="probe", required=True)
    k = esub.add_parser("knn", help="weighted k-NN on [cls] features (DINO protocol)")
    k.add_argument("weights", help="teacher.safetensors or a run folder")
    k.add_argument("--train-dir", default="", help="labelled image folder for the neighbours")
    k.add_argument("--test-dir", default="", help="labelled image folder to classify")
    k.add_argument("--random-init", action="store_true", help="same architecture, untrained weights")
    k.add_argument("--json", help="also write the results here")
    k.add_argument("--no-progress", action="store_true")
    k.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. eval.batch_size=512")
    k.set_defaults(func=_cmd_knn)

    d = sub.add_parser("demo", help="pre-train on the embedded CIFAR-10 sample, then k-NN vs random init")
    d.add_argument("--config", default="configs/demo.yaml")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(func=_cmd_demo)
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


def main(argv: list[str] | None = None) -> int:
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
