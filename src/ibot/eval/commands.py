"""What each ``ibot eval`` command computes: weights + folders -> a JSON-able result, and its table.

The command line (``ibot.cli``) parses arguments into an ``EvalRequest``, calls one ``run_*``
here with it, prints its ``format_*`` table and keeps the result in the run folder for
``ibot report``. Each ``run_*`` reports the files it skipped itself (one line,
``RUN/eval/skipped-<command>.tsv``), so every caller of it (``ibot eval``, ``ibot ablate``) does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ibot.config import Config
from ibot.data.skips import Skip, SkipLog, report_skips
from ibot.errors import IBOTError
from ibot.eval.features import Features, extract_features, load_frozen, require_labels, train_classes
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime


@dataclass(frozen=True)
class EvalRequest:
    """What one evaluation command evaluates: ``weights`` (a run folder, its teacher file or a
    foreign ViT; with ``random_init`` the same architecture untrained), the labelled folders
    (default: the run's ``eval.train_path`` / ``eval.test_path``), config ``overrides``, the
    feature cache (default: RUN/features) and whether to show progress bars."""

    weights: str
    train_dir: str = ""
    test_dir: str = ""
    random_init: bool = False
    overrides: tuple[str, ...] = ()
    cache_dir: str = ""
    progress: bool = True

    @property
    def run_dir(self) -> Path:
        """The folder results go to: the run folder, or the folder of a weights file."""
        return run_dir(self.weights)

    @property
    def label(self) -> str:
        """How tables and result files name the weights."""
        return "random-init" if self.random_init else str(self.weights)

    def feature_cache(self) -> str:
        return self.cache_dir or str(self.run_dir / "features")


@dataclass(frozen=True)
class EvalSetup:
    """A request made concrete: the frozen backbone, its config with the overrides, the runtime
    and the two labelled folders."""

    backbone: MaskedViT
    cfg: Config
    runtime: Runtime
    train_dir: str
    test_dir: str
    command: str  # e.g. "knn": named in errors

    def features(self, request: EvalRequest, folder: str, **options: Any) -> Features:
        """``extract_features`` of ``folder`` (labelled: one line otherwise) with ``options``."""
        feats = extract_features(self.backbone, folder, self.cfg, self.runtime, progress=request.progress, **options)
        require_labels(feats.labels, folder, f"eval {self.command}")
        return feats

    def feature_pair(self, request: EvalRequest, **options: Any) -> tuple[Features, Features]:
        """The train folder's features, then the test folder's labelled by the train classes' names."""
        train = self.features(request, self.train_dir, **options)
        classes = train_classes(train, self.train_dir, self.cfg, f"eval {self.command}")
        return train, self.features(request, self.test_dir, train=classes, **options)


def eval_setup(request: EvalRequest, command: str) -> EvalSetup:
    """The frozen backbone of ``request`` (fine-tuning: with ``finetune.drop_path``) and its folders."""
    frozen = load_frozen(request.weights, request.overrides, request.random_init, finetune=command == "finetune")
    cfg = frozen.cfg
    train_dir = request.train_dir or cfg.eval.train_path
    test_dir = request.test_dir or cfg.eval.test_path
    if not train_dir or not test_dir:
        raise IBOTError(f"eval {command}: give --train-dir and --test-dir (or eval.train_path / eval.test_path)")
    return EvalSetup(frozen.backbone, cfg, frozen.runtime, train_dir, test_dir, command)


def run_dir(weights: str) -> Path:
    """The folder evaluation results go to: the run folder, or the folder of a weights file."""
    path = Path(weights)
    return path if path.is_dir() else path.parent


def skipped_list_path(request: EvalRequest, command: str) -> Path:
    """``RUN/eval/skipped-<command>[-random-init].tsv``: next to the command's result JSON."""
    from ibot.report import eval_result_path

    result = eval_result_path(request.run_dir, command, request.random_init)
    return result.with_name(f"skipped-{result.stem}.tsv")


def report_eval_skips(request: EvalRequest, command: str, *sources: Iterable[Skip]) -> dict:
    """One summary line and the full list of what ``sources`` left out; the counts for the result JSON."""
    log = SkipLog(s for source in sources for s in source)
    report_skips(log, f"eval {command}", skipped_list_path(request, command))
    return log.as_counts()


def run_knn(request: EvalRequest) -> dict:
    """k-NN of the frozen backbone: {"weights", "train_images", ..., "knn": {k: {"top1", "top5"}}}."""
    from ibot.eval.knn import knn_classify

    setup = eval_setup(request, "knn")
    train_f, test_f = setup.feature_pair(request, cache_dir=request.feature_cache())
    e = setup.cfg.eval
    results = knn_classify(train_f.last_cls, train_f.labels, test_f.last_cls, test_f.labels, e.knn_k, e.knn_temperature)
    return {
        "weights": request.label,
        "train_images": int(train_f.labels.numel()),
        "test_images": int(test_f.labels.numel()),
        **report_eval_skips(request, "knn", train_f.skips, test_f.skips),
        "knn": {k: {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()},
    }


def probe_features(setup: EvalSetup, request: EvalRequest) -> list[Features]:
    """[cls] of the last 4 blocks and the last patch tokens of train and test, through the cache."""
    return list(setup.feature_pair(request, n_last=4, patches=True, cache_dir=request.feature_cache()))


def trained_probes(setup: EvalSetup, request: EvalRequest, names, key: str):  # type: ignore[no-untyped-def]
    """Probes ``names`` (config key ``key``) trained on the cached features of the two folders."""
    from ibot.eval.probes import PROBES, train_probes

    unknown = [p for p in names if p not in PROBES]
    if unknown:
        raise IBOTError(f"{key}: unknown {', '.join(unknown)}; choose from {', '.join(PROBES)}")
    feats = probe_features(setup, request)
    return feats, train_probes(feats[0], feats[1], tuple(names), **probe_sweep(setup.cfg, request.progress))


def probe_sweep(cfg: Config, progress: bool) -> dict:
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


def run_robustness(request: EvalRequest) -> dict:
    """A probe trained on clean features, scored under the 15 CIFAR-10-C corruptions x 5 severities."""
    from ibot.eval.robustness import corruption_benchmark

    setup = eval_setup(request, "robustness")
    cfg, e = setup.cfg, setup.cfg.eval
    feats, (probe,) = trained_probes(setup, request, [e.robustness_probe], "eval.robustness_probe")
    result = corruption_benchmark(
        probe,
        setup.backbone,
        setup.test_dir,
        cfg,
        setup.runtime,
        e.robustness_images,
        feats[0].cls.shape[1],
        cfg.train.seed,
        request.progress,
        train_classes(feats[0], setup.train_dir, cfg, "eval robustness"),
    )
    return {
        "weights": request.label,
        "probe": probe.probe,
        "lr": probe.lr,
        "test_top1_all_clean": probe.test_top1,
        **result.as_dict(),
        # The corrupted subset is drawn from the test folder, whose every file the features covered.
        **report_eval_skips(request, "robustness", feats[0].skips, feats[1].skips),
    }


def run_finetune(request: EvalRequest) -> dict:
    """Full fine-tuning with layer-wise lr decay, mixup/cutmix and drop path; test top-1."""
    from ibot.eval.finetune import finetune

    setup = eval_setup(request, "finetune")
    skips = SkipLog()
    result = finetune(
        setup.backbone, setup.cfg, setup.train_dir, setup.test_dir, setup.runtime, request.progress, skips
    )
    return {
        "weights": request.label,
        "settings": setup.cfg.to_dict()["finetune"],
        **result,
        **report_eval_skips(request, "finetune", skips),
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


def run_probe(request: EvalRequest) -> dict:
    """Linear and patch-pooling probes of the frozen backbone: {"weights", ..., "probes": [{probe, lr, ...}]}."""
    setup = eval_setup(request, "probe")
    feats, results = trained_probes(setup, request, setup.cfg.eval.probes, "eval.probes")
    pooled = [r for r in results if r.probe == "attention-pool"]
    if pooled:
        from ibot.eval.attention_maps import save_attention_pool_maps
        from ibot.eval.features import build_eval_dataset
        from ibot.report import ATTENTION_PNG, EVAL_DIR

        name = ATTENTION_PNG.replace(".png", "-random-init.png") if request.random_init else ATTENTION_PNG
        save_attention_pool_maps(
            pooled[0],
            setup.backbone,
            build_eval_dataset(setup.test_dir, setup.cfg),
            setup.runtime,
            setup.cfg.data.mean,
            setup.cfg.data.std,
            request.run_dir / EVAL_DIR / name,
        )
    return {
        "weights": request.label,
        "train_images": int(feats[0].labels.numel()),
        "test_images": int(feats[1].labels.numel()),
        **report_eval_skips(request, "probe", feats[0].skips, feats[1].skips),
        "probes": [r.as_dict() for r in results],
    }


def run_dense(request: EvalRequest) -> dict:
    """Mosaic segmentation probe: patch tokens vs. broadcast [cls] -> {"weights", "dense": [...]}."""
    from ibot.eval.dense import mosaic_tokens, train_dense_probes
    from ibot.eval.features import dataset_skips, eval_dataset_pair

    setup = eval_setup(request, "dense")
    cfg, e = setup.cfg, setup.cfg.eval
    datasets = eval_dataset_pair(setup.train_dir, setup.test_dir, cfg, "eval dense")
    tokens = [
        mosaic_tokens(setup.backbone, dataset, count, e.dense_grid, setup.runtime, seed, e.batch_size, request.progress)
        for dataset, count, seed in ((datasets[0], e.dense_train_mosaics, 0), (datasets[1], e.dense_test_mosaics, 1))
    ]
    results = train_dense_probes(tokens[0], tokens[1], **probe_sweep(cfg, request.progress))
    return {
        "weights": request.label,
        "mosaics": f"{e.dense_grid}x{e.dense_grid}, {e.dense_train_mosaics} train / {e.dense_test_mosaics} test",
        "dense": [r.as_dict() for r in results],
        # Mosaics decode the images they draw: the scan's skips and those drawn ones.
        **report_eval_skips(request, "dense", *(dataset_skips(d) for d in datasets)),
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


def last_cls_features(setup: EvalSetup, request: EvalRequest, folder: str) -> Features:
    """The last block's [cls] of one ``folder`` through the cache (cluster; pairs: ``feature_pair``)."""
    return setup.features(request, folder, cache_dir=request.feature_cache())


def run_retrieval(request: EvalRequest) -> dict:
    """Every test image queries the train images (faiss, L2-normalised [cls]): mAP@R, recall@1, recall@5."""
    from ibot.eval.retrieval import index_settings, normalize, retrieval_metrics

    setup = eval_setup(request, "retrieval")
    train_f, test_f = setup.feature_pair(request, cache_dir=request.feature_cache())
    scores, index = retrieval_metrics(
        normalize(train_f.last_cls),
        train_f.labels.numpy(),
        normalize(test_f.last_cls),
        test_f.labels.numpy(),
        index_settings(setup.cfg),
    )
    return {
        "weights": request.label,
        "train_images": int(train_f.labels.numel()),
        "test_images": int(test_f.labels.numel()),
        "index": index,
        **scores.as_dict(),
        **report_eval_skips(request, "retrieval", train_f.skips, test_f.skips),
    }


def format_retrieval(*results: dict) -> str:
    head = "| weights | index | mAP@R | recall@1 | recall@5 |"
    rows = [
        f"| {r['weights']} | {r['index']} | {r['map_at_r']:.2f} | {r['recall_at_1']:.2f} | {r['recall_at_5']:.2f} |"
        for r in results
    ]
    return "\n".join([head, "|---|---|---|---|---|", *rows])


def run_cluster(request: EvalRequest) -> dict:
    """k-means (k = classes) on one folder's [cls]: {"weights", "split", "accuracy", "nmi", "ari", "fmi", ...}."""
    from ibot.eval.cluster import evaluate_clustering

    setup = eval_setup(request, "cluster")
    e = setup.cfg.eval
    folder = setup.test_dir if e.cluster_split == "test" else setup.train_dir
    feats = last_cls_features(setup, request, folder)
    return {
        "weights": request.label,
        "split": e.cluster_split,
        **evaluate_clustering(feats.last_cls, feats.labels, e.cluster_restarts, setup.cfg.train.seed),
        **report_eval_skips(request, "cluster", feats.skips),
    }


def format_cluster(result: dict) -> str:
    head = f"| k-means on [cls] ({result['weights']}, {result['split']} split) | k | accuracy (Hungarian) |"
    scores = " | ".join(f"{result[m]:.3f}" for m in ("nmi", "ari", "fmi"))
    row = f"| {result['images']} images | {result['clusters']} | {result['accuracy']:.2f} | {scores} |"
    return "\n".join([head + " NMI | ARI | FMI |", "|---|---|---|---|---|---|", row])


def run_lowshot(request: EvalRequest) -> dict:
    """k-NN and logistic regression on few labels: {"weights", ..., "lowshot": [{setting, knn, logreg}]}."""
    from ibot.eval.lowshot import LowshotProtocol, Setting, Split, evaluate_lowshot

    setup = eval_setup(request, "lowshot")
    e = setup.cfg.eval
    train_f, test_f = setup.feature_pair(request, cache_dir=request.feature_cache())
    settings = (*(Setting(shots=n) for n in e.lowshot_shots), *(Setting(fraction=f) for f in e.lowshot_fractions))
    protocol = LowshotProtocol(settings, e.lowshot_draws, e.lowshot_knn_k, e.knn_temperature, e.lowshot_logreg_c)
    data = Split(train_f.last_cls, train_f.labels, test_f.last_cls, test_f.labels)
    return {
        "weights": request.label,
        "train_images": int(train_f.labels.numel()),
        "test_images": int(test_f.labels.numel()),
        "draws": list(e.lowshot_draws),
        "knn_k": e.lowshot_knn_k,
        "logreg_c": e.lowshot_logreg_c,
        **report_eval_skips(request, "lowshot", train_f.skips, test_f.skips),
        "lowshot": evaluate_lowshot(data, protocol),
    }


def format_lowshot(result: dict) -> str:
    def cell(scores: dict) -> str:
        return f"{scores['mean']:.2f} ± {scores['std']:.2f}"

    head = (
        f"| labels ({result['weights']}, {len(result['draws'])} draws) | labelled images "
        f"| k-NN (k<={result['knn_k']}) top-1 | logistic regression top-1 |"
    )
    rows = [f"| {r['setting']} | {r['labelled']} | {cell(r['knn'])} | {cell(r['logreg'])} |" for r in result["lowshot"]]
    return "\n".join([head, "|---|---|---|---|", *rows])
