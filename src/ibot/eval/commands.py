"""What each ``ibot eval`` command computes: weights + folders -> a JSON-able result, and its table.

The command line (``ibot.cli``) parses arguments, calls one ``run_*`` here, prints its
``format_*`` table and keeps the result in the run folder for ``ibot report``. Each ``run_*``
reports the files it skipped itself (one line, ``RUN/eval/skipped-<command>.tsv``), so every
caller of it (``ibot eval``, ``ibot demo``) does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ibot.data.skips import Skip, SkipLog, report_skips
from ibot.errors import IBOTError


def eval_setup(weights: str, train_dir: str, test_dir: str, random_init: bool, overrides: list[str], command: str):  # type: ignore[no-untyped-def]
    """Frozen backbone, its config with ``overrides``, the runtime and the two labelled folders."""
    import torch

    from ibot.config import config_from_dict
    from ibot.eval.features import frozen_backbone
    from ibot.runtime import Runtime
    from ibot.storage import load_backbone

    tensors, config_dict = load_backbone(weights)  # read once: weights and config
    cfg = config_from_dict(config_dict, overrides)  # before building: the overrides may set drop path
    drop_path = cfg.finetune.drop_path if command == "finetune" else 0.0
    backbone = frozen_backbone(weights, tensors, cfg, random_init, seed=0, drop_path_rate=drop_path)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    train_dir = train_dir or cfg.eval.train_path
    test_dir = test_dir or cfg.eval.test_path
    if not train_dir or not test_dir:
        raise IBOTError(f"eval {command}: give --train-dir and --test-dir (or eval.train_path / eval.test_path)")
    return backbone, cfg, Runtime.resolve(cfg.train), train_dir, test_dir


def run_dir(weights: str) -> Path:
    """The folder evaluation results go to: the run folder, or the folder of a weights file."""
    path = Path(weights)
    return path if path.is_dir() else path.parent


def skipped_list_path(weights: str, command: str, random_init: bool) -> Path:
    """``RUN/eval/skipped-<command>[-random-init].tsv``: next to the command's result JSON."""
    from ibot.report import eval_result_path

    result = eval_result_path(run_dir(weights), command, random_init)
    return result.with_name(f"skipped-{result.stem}.tsv")


def report_eval_skips(weights: str, command: str, random_init: bool, *sources: Iterable[Skip]) -> dict:
    """One summary line and the full list of what ``sources`` left out; the counts for the result JSON."""
    log = SkipLog(s for source in sources for s in source)
    report_skips(log, f"eval {command}", skipped_list_path(weights, command, random_init))
    return log.as_counts()


def require_labels(folder: str, labels, command: str) -> None:  # type: ignore[no-untyped-def]
    if bool((labels < 0).any()):
        raise IBOTError(f"{folder}: {command} needs labelled images, one sub-folder per class")


def run_knn(
    weights: str,
    train_dir: str,
    test_dir: str,
    random_init: bool,
    overrides: list[str],
    cache_dir: str = "",
    progress: bool = True,
) -> dict:
    """k-NN of the frozen backbone at ``weights``: {"weights", "train_images", ..., "knn": {k: {"top1", "top5"}}}."""
    from ibot.eval.features import extract_features
    from ibot.eval.knn import knn_classify

    backbone, cfg, runtime, train_dir, test_dir = eval_setup(
        weights, train_dir, test_dir, random_init, overrides, "knn"
    )
    train_f = extract_features(backbone, train_dir, cfg, runtime, progress=progress)
    test_f = extract_features(backbone, test_dir, cfg, runtime, progress=progress)
    for folder, feats in ((train_dir, train_f), (test_dir, test_f)):
        require_labels(folder, feats.labels, "k-NN")
    results = knn_classify(
        train_f.last_cls, train_f.labels, test_f.last_cls, test_f.labels, cfg.eval.knn_k, cfg.eval.knn_temperature
    )
    return {
        "weights": weights_label(weights, random_init),
        "train_images": int(train_f.labels.numel()),
        "test_images": int(test_f.labels.numel()),
        **report_eval_skips(weights, "knn", random_init, train_f.skips, test_f.skips),
        "knn": {k: {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()},
    }


def probe_features(backbone, cfg, runtime, weights: str, folders: tuple[str, str], cache_dir: str, progress: bool):  # type: ignore[no-untyped-def]
    """[cls] of the last 4 blocks and the last patch tokens of train and test, through the cache."""
    from ibot.eval.features import extract_features

    cache = cache_dir or str(run_dir(weights) / "features")
    feats = [
        extract_features(backbone, folder, cfg, runtime, progress=progress, n_last=4, patches=True, cache_dir=cache)
        for folder in folders
    ]
    for folder, f in zip(folders, feats):
        require_labels(folder, f.labels, "a probe")
    return feats


def trained_probes(backbone, cfg, runtime, weights, folders, names, key, cache_dir, progress):  # type: ignore[no-untyped-def]
    """Probes ``names`` (config key ``key``) trained on the cached features of ``folders``."""
    from ibot.eval.probes import PROBES, train_probes

    unknown = [p for p in names if p not in PROBES]
    if unknown:
        raise IBOTError(f"{key}: unknown {', '.join(unknown)}; choose from {', '.join(PROBES)}")
    feats = probe_features(backbone, cfg, runtime, weights, folders, cache_dir, progress)
    return feats, train_probes(feats[0], feats[1], tuple(names), **probe_sweep(cfg, progress))


def probe_sweep(cfg, progress: bool) -> dict:  # type: ignore[no-untyped-def]
    """The lr sweep / epochs / split settings shared by every probe trainer (``eval.probe_*``)."""
    e = cfg.eval
    return {
        "lrs": e.probe_lrs,
        "epochs": e.probe_epochs,
        "batch_size": e.probe_batch_size,
        "val_fraction": e.probe_val_fraction,
        "seed": cfg.train.seed,
        "progress": progress,
        "max_extensions": e.probe_max_extensions,
    }


def weights_label(weights: str, random_init: bool) -> str:
    return "random-init" if random_init else str(weights)


def run_robustness(
    weights: str,
    train_dir: str,
    test_dir: str,
    random_init: bool,
    overrides: list[str],
    cache_dir: str = "",
    progress: bool = True,
) -> dict:
    """A probe trained on clean features, scored under the 15 CIFAR-10-C corruptions x 5 severities."""
    from ibot.eval.robustness import corruption_benchmark

    backbone, cfg, runtime, train_dir, test_dir = eval_setup(
        weights, train_dir, test_dir, random_init, overrides, "robustness"
    )
    e = cfg.eval
    feats, (probe,) = trained_probes(
        backbone,
        cfg,
        runtime,
        weights,
        (train_dir, test_dir),
        [e.robustness_probe],
        "eval.robustness_probe",
        cache_dir,
        progress,
    )
    result = corruption_benchmark(
        probe, backbone, test_dir, cfg, runtime, e.robustness_images, feats[0].cls.shape[1], cfg.train.seed, progress
    )
    return {
        "weights": weights_label(weights, random_init),
        "probe": probe.probe,
        "lr": probe.lr,
        "test_top1_all_clean": probe.test_top1,
        **result.as_dict(),
        # The corrupted subset is drawn from the test folder, whose every file the features covered.
        **report_eval_skips(weights, "robustness", random_init, feats[0].skips, feats[1].skips),
    }


def run_finetune(
    weights: str,
    train_dir: str,
    test_dir: str,
    random_init: bool,
    overrides: list[str],
    cache_dir: str = "",
    progress: bool = True,
) -> dict:
    """Full fine-tuning with layer-wise lr decay, mixup/cutmix and drop path; test top-1."""
    from ibot.eval.finetune import finetune

    backbone, cfg, runtime, train_dir, test_dir = eval_setup(
        weights, train_dir, test_dir, random_init, overrides, "finetune"
    )
    skips = SkipLog()
    result = finetune(backbone, cfg, train_dir, test_dir, runtime, progress, skips)
    return {
        "weights": weights_label(weights, random_init),
        "settings": cfg.to_dict()["finetune"],
        **result,
        **report_eval_skips(weights, "finetune", random_init, skips),
    }


def format_finetune(result: dict) -> str:
    return "\n".join(
        [
            f"| fine-tuning ({result['weights']}, {result['epochs']:g} epochs) | test top-1 |",
            "|---|---|",
            f"| | {result['test_top1']:.2f} |",
        ]
    )


def format_robustness(result: dict) -> str:
    rows = [f"| {name} | {top1:.2f} |" for name, top1 in result["per_corruption"].items()]
    head = f"| corruption ({result['weights']}, probe {result['probe']}) | top-1, mean of severities 1-5 |"
    tail = [
        f"| clean (same images) | {result['clean_top1']:.2f} |",
        f"| **mean corrupted** | **{result['mean_corrupted_top1']:.2f}** |",
    ]
    return "\n".join([head, "|---|---|", *rows, *tail])


def run_probe(
    weights: str,
    train_dir: str,
    test_dir: str,
    random_init: bool,
    overrides: list[str],
    cache_dir: str = "",
    progress: bool = True,
) -> dict:
    """Linear and patch-pooling probes of the frozen backbone: {"weights", ..., "probes": [{probe, lr, ...}]}."""
    backbone, cfg, runtime, train_dir, test_dir = eval_setup(
        weights, train_dir, test_dir, random_init, overrides, "probe"
    )
    feats, results = trained_probes(
        backbone, cfg, runtime, weights, (train_dir, test_dir), cfg.eval.probes, "eval.probes", cache_dir, progress
    )
    pooled = [r for r in results if r.probe == "attention-pool"]
    if pooled:
        from ibot.eval.attention_maps import save_attention_pool_maps
        from ibot.eval.features import build_eval_dataset
        from ibot.report import ATTENTION_PNG, EVAL_DIR

        name = ATTENTION_PNG.replace(".png", "-random-init.png") if random_init else ATTENTION_PNG
        save_attention_pool_maps(
            pooled[0],
            backbone,
            build_eval_dataset(test_dir, cfg),
            runtime,
            cfg.data.mean,
            cfg.data.std,
            run_dir(weights) / EVAL_DIR / name,
        )
    return {
        "weights": weights_label(weights, random_init),
        "train_images": int(feats[0].labels.numel()),
        "test_images": int(feats[1].labels.numel()),
        **report_eval_skips(weights, "probe", random_init, feats[0].skips, feats[1].skips),
        "probes": [r.as_dict() for r in results],
    }


def run_dense(
    weights: str,
    train_dir: str,
    test_dir: str,
    random_init: bool,
    overrides: list[str],
    cache_dir: str = "",
    progress: bool = True,
) -> dict:
    """Mosaic segmentation probe: patch tokens vs. broadcast [cls] -> {"weights", "dense": [...]}."""
    from ibot.eval.dense import mosaic_tokens, train_dense_probes
    from ibot.eval.features import build_eval_dataset

    backbone, cfg, runtime, train_dir, test_dir = eval_setup(
        weights, train_dir, test_dir, random_init, overrides, "dense"
    )
    from ibot.eval.features import dataset_skips

    e = cfg.eval
    datasets = [build_eval_dataset(folder, cfg) for folder in (train_dir, test_dir)]
    tokens = [
        mosaic_tokens(backbone, dataset, count, e.dense_grid, runtime, seed, e.batch_size, progress)
        for dataset, count, seed in ((datasets[0], e.dense_train_mosaics, 0), (datasets[1], e.dense_test_mosaics, 1))
    ]
    results = train_dense_probes(tokens[0], tokens[1], **probe_sweep(cfg, progress))
    return {
        "weights": weights_label(weights, random_init),
        "mosaics": f"{e.dense_grid}x{e.dense_grid}, {e.dense_train_mosaics} train / {e.dense_test_mosaics} test",
        "dense": [r.as_dict() for r in results],
        # Mosaics decode the images they draw: the scan's skips and those drawn ones.
        **report_eval_skips(weights, "dense", random_init, *(dataset_skips(d) for d in datasets)),
    }


def format_lr(row: dict) -> str:
    """The picked lr, with how often its grid was extended and whether it is still on an edge."""
    notes = [f"extended {row['extended']}x"] if row.get("extended") else []
    notes += [f"{row['lr_edge']} edge"] if row.get("lr_edge") else []
    return f"{row['lr']:g}" + (f" ({', '.join(notes)})" if notes else "")


def format_dense(result: dict) -> str:
    rows = [
        f"| {r['features']} | {format_lr(r)} | {r['test_miou']:.2f} | {r['test_pixel_accuracy']:.2f} |"
        for r in result["dense"]
    ]
    head = f"| features ({result['weights']}, mosaics {result['mosaics']}) | lr | test mIoU | pixel accuracy |"
    return "\n".join([head, "|---|---|---|---|", *rows])


def format_probe(result: dict) -> str:
    rows = [f"| {r['probe']} | {format_lr(r)} | {r['val_top1']:.2f} | {r['test_top1']:.2f} |" for r in result["probes"]]
    head = f"| probe ({result['weights']}) | lr (picked on val) | val top-1 | test top-1 |"
    return "\n".join([head, "|---|---|---|---|", *rows])


def format_knn(*results: dict) -> str:
    ks = list(results[0]["knn"])
    head = "| weights | " + " | ".join(f"k={k} top-1 / top-5" for k in ks) + " |"
    rule = "|---|" + "---|" * len(ks)
    rows = [
        f"| {r['weights']} | " + " | ".join(f"{r['knn'][k]['top1']:.2f} / {r['knn'][k]['top5']:.2f}" for k in ks) + " |"
        for r in results
    ]
    return "\n".join([head, rule, *rows])
