"""What each ``ibot eval`` command computes: weights + folders -> a JSON-able result, and its table.

``COMMANDS`` is the registry: name -> its ``run_*`` (an ``EvalRequest`` in, a typed report of
``ibot.eval.results`` out), its table and its help line. The command line (``ibot.cli``) builds
its sub-commands from it, prints the table and keeps ``report.as_dict()`` in the run folder for
``ibot report``. Each ``run_*`` reports the files it skipped itself (one line,
``RUN/eval/skipped-<command>.tsv``), so every caller of it (``ibot eval``, ``ibot ablate``) does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ibot.config import Config
from ibot.data.skips import Skip, SkipLog, report_skips
from ibot.errors import IBOTError
from ibot.eval import results as r
from ibot.eval.results import EvalReport
from ibot.run_folder import RunFolder

if TYPE_CHECKING:  # the registry is read to build the CLI's parser: the models load when a command runs
    from ibot.eval.features import Features
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
    def folder(self) -> RunFolder:
        """The folder results go to: the run folder, or the folder of a weights file."""
        return RunFolder.of(self.weights)

    @property
    def label(self) -> str:
        """How tables and result files name the weights."""
        return "random-init" if self.random_init else str(self.weights)

    def feature_cache(self) -> str:
        return self.cache_dir or str(self.folder.features)


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

    def features(
        self, request: EvalRequest, folder: str, pending: list[Callable[[], None]] | None = None, **options: Any
    ) -> Features:
        """``extract_features`` of ``folder`` (labelled: one line otherwise) with ``options``. The cache
        is written once the labels passed, or appended to ``pending`` for a caller that may still refuse."""
        from ibot.eval.features import extract_features, require_labels

        writes: list[Callable[[], None]] = [] if pending is None else pending
        feats = extract_features(
            self.backbone, folder, self.cfg, self.runtime, progress=request.progress, pending=writes, **options
        )
        require_labels(feats.labels, folder, f"eval {self.command}")
        if pending is None:
            for write in writes:
                write()
        return feats

    def feature_pair(self, request: EvalRequest, **options: Any) -> tuple[Features, Features]:
        """The train folder's features, then the test folder's labelled by the train classes' names.

        Every refusal comes before the run folder changes: the class names are aligned on the two
        listings before any extraction, and the cache is written once both folders are done.
        """
        from ibot.eval.features import eval_dataset_pair, train_classes

        purpose = f"eval {self.command}"
        train_set, test_set = eval_dataset_pair(self.train_dir, self.test_dir, self.cfg, purpose)
        pending: list[Callable[[], None]] = []
        train = self.features(request, self.train_dir, dataset=train_set, pending=pending, **options)
        train_classes(train, self.train_dir, self.cfg, purpose)  # still 2 classes once decoded?
        test = self.features(request, self.test_dir, dataset=test_set, pending=pending, **options)
        for write in pending:
            write()
        return train, test


def eval_setup(request: EvalRequest, command: str) -> EvalSetup:
    """The frozen backbone of ``request`` (fine-tuning: with ``finetune.drop_path``) and its folders."""
    from ibot.eval.features import load_frozen

    frozen = load_frozen(request.weights, request.overrides, request.random_init, finetune=command == "finetune")
    cfg = frozen.cfg
    train_dir = request.train_dir or cfg.eval.train_path
    test_dir = request.test_dir or cfg.eval.test_path
    if not train_dir or not test_dir:
        raise IBOTError(f"eval {command}: give --train-dir and --test-dir (or eval.train_path / eval.test_path)")
    reads = (cfg.eval.cluster_split,) if command == "cluster" else ("train", "test")  # cluster reads one
    if not request.train_dir and "train" in reads:
        _check_default_folder(request, "eval.train_path", train_dir, "--train-dir")
    if not request.test_dir and "test" in reads:
        _check_default_folder(request, "eval.test_path", test_dir, "--test-dir")
    return EvalSetup(frozen.backbone, cfg, frozen.runtime, train_dir, test_dir, command)


def _check_default_folder(request: EvalRequest, key: str, folder: str, option: str) -> None:
    """A folder taken from the config, missing: named with its key, so the user sees where it came from."""
    if not Path(folder).exists():
        source = "an override" if any(o.startswith(f"{key}=") for o in request.overrides) else "the run's config"
        raise IBOTError(f"{key}={folder} ({source}): path does not exist; give {option}")


def report_eval_skips(request: EvalRequest, command: str, *sources: Iterable[Skip]) -> dict[str, Any]:
    """One summary line and the full list of what ``sources`` left out (``RUN/eval/skipped-<command>.tsv``);
    the counts for the result JSON."""
    log = SkipLog(s for source in sources for s in source)
    report_skips(log, f"eval {command}", request.folder.eval_skips(command, request.random_init))
    return log.as_counts()


def run_knn(request: EvalRequest) -> r.KnnReport:
    """Weighted k-NN of the frozen backbone's [cls]: top-1 / top-5 at each k of ``eval.knn_k``."""
    from ibot.eval.knn import knn_classify

    setup = eval_setup(request, "knn")
    train_f, test_f = setup.feature_pair(request, cache_dir=request.feature_cache())
    e = setup.cfg.eval
    results = knn_classify(train_f.last_cls, train_f.labels, test_f.last_cls, test_f.labels, e.knn_k, e.knn_temperature)
    return r.KnnReport(
        request.label,
        report_eval_skips(request, "knn", train_f.skips, test_f.skips),
        train_images=int(train_f.labels.numel()),
        test_images=int(test_f.labels.numel()),
        knn={k: r.TopK(t1, t5) for k, (t1, t5) in results.items()},
    )


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


def run_robustness(request: EvalRequest) -> r.RobustnessReport:
    """A probe trained on clean features, scored under the 15 CIFAR-10-C corruptions x 5 severities."""
    from ibot.eval.features import train_classes
    from ibot.eval.robustness import corruption_benchmark, require_rgb

    setup = eval_setup(request, "robustness")
    require_rgb(setup.cfg)  # before minutes of features
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
    return r.RobustnessReport(
        request.label,
        # The corrupted subset is drawn from the test folder, whose every file the features covered.
        report_eval_skips(request, "robustness", feats[0].skips, feats[1].skips),
        probe=probe.probe,
        lr=probe.lr,
        test_top1_all_clean=probe.test_top1,
        benchmark=result,
    )


def run_finetune(request: EvalRequest) -> r.FinetuneReport:
    """Full fine-tuning with layer-wise lr decay, mixup/cutmix and drop path; test top-1."""
    from ibot.eval.finetune import finetune

    setup = eval_setup(request, "finetune")
    skips = SkipLog()
    result = finetune(
        setup.backbone, setup.cfg, setup.train_dir, setup.test_dir, setup.runtime, request.progress, skips
    )
    return r.FinetuneReport(
        request.label,
        report_eval_skips(request, "finetune", skips),
        settings=setup.cfg.to_dict()["finetune"],
        **result,
    )


def run_probe(request: EvalRequest) -> r.ProbeReport:
    """Linear and patch-pooling probes of the frozen backbone, each at the lr picked on validation."""
    setup = eval_setup(request, "probe")
    feats, results = trained_probes(setup, request, setup.cfg.eval.probes, "eval.probes")
    pooled = [p for p in results if p.probe == "attention-pool"]
    if pooled:
        from ibot.eval.attention_maps import save_attention_pool_maps
        from ibot.eval.features import build_eval_dataset

        save_attention_pool_maps(
            pooled[0],
            setup.backbone,
            build_eval_dataset(setup.test_dir, setup.cfg),
            setup.runtime,
            setup.cfg.data.mean,
            setup.cfg.data.std,
            request.folder.attention_pool(request.random_init),
        )
    return r.ProbeReport(
        request.label,
        report_eval_skips(request, "probe", feats[0].skips, feats[1].skips),
        train_images=int(feats[0].labels.numel()),
        test_images=int(feats[1].labels.numel()),
        probes=list(results),
    )


def run_dense(request: EvalRequest) -> r.DenseReport:
    """Mosaic segmentation probe: patch tokens vs. broadcast [cls]."""
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
    return r.DenseReport(
        request.label,
        # Mosaics decode the images they draw: the scan's skips and those drawn ones.
        report_eval_skips(request, "dense", *(dataset_skips(d) for d in datasets)),
        mosaics=f"{e.dense_grid}x{e.dense_grid}, {e.dense_train_mosaics} train / {e.dense_test_mosaics} test",
        dense=list(results),
    )


def last_cls_features(setup: EvalSetup, request: EvalRequest, folder: str) -> Features:
    """The last block's [cls] of one ``folder`` through the cache (cluster; pairs: ``feature_pair``)."""
    return setup.features(request, folder, cache_dir=request.feature_cache())


def run_retrieval(request: EvalRequest) -> r.RetrievalReport:
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
    return r.RetrievalReport(
        request.label,
        report_eval_skips(request, "retrieval", train_f.skips, test_f.skips),
        train_images=int(train_f.labels.numel()),
        test_images=int(test_f.labels.numel()),
        index=index,
        scores=scores,
    )


def run_cluster(request: EvalRequest) -> r.ClusterReport:
    """k-means (k = classes) on one folder's [cls]: Hungarian accuracy, NMI, ARI, FMI."""
    from ibot.eval.cluster import evaluate_clustering

    setup = eval_setup(request, "cluster")
    e = setup.cfg.eval
    folder = setup.test_dir if e.cluster_split == "test" else setup.train_dir
    feats = last_cls_features(setup, request, folder)
    return r.ClusterReport(
        request.label,
        report_eval_skips(request, "cluster", feats.skips),
        split=e.cluster_split,
        **evaluate_clustering(feats.last_cls, feats.labels, e.cluster_restarts, setup.cfg.train.seed),
    )


def run_lowshot(request: EvalRequest) -> r.LowshotReport:
    """k-NN and logistic regression on few labels, mean and std over seeded draws per setting."""
    from ibot.eval.lowshot import LowshotProtocol, Setting, Split, evaluate_lowshot

    setup = eval_setup(request, "lowshot")
    e = setup.cfg.eval
    train_f, test_f = setup.feature_pair(request, cache_dir=request.feature_cache())
    settings = (*(Setting(shots=n) for n in e.lowshot_shots), *(Setting(fraction=f) for f in e.lowshot_fractions))
    protocol = LowshotProtocol(settings, e.lowshot_draws, e.lowshot_knn_k, e.knn_temperature, e.lowshot_logreg_c)
    data = Split(train_f.last_cls, train_f.labels, test_f.last_cls, test_f.labels, train_f.classes)
    return r.LowshotReport(
        request.label,
        report_eval_skips(request, "lowshot", train_f.skips, test_f.skips),
        train_images=int(train_f.labels.numel()),
        test_images=int(test_f.labels.numel()),
        draws=list(e.lowshot_draws),
        knn_k=e.lowshot_knn_k,
        logreg_c=e.lowshot_logreg_c,
        lowshot=evaluate_lowshot(data, protocol),
    )


@dataclass(frozen=True)
class EvalCommand:
    """One ``ibot eval`` sub-command: what it runs, how its report prints, its help line."""

    name: str
    run: Callable[[EvalRequest], EvalReport]
    format: Callable[..., str]
    help: str


COMMANDS: dict[str, EvalCommand] = {
    c.name: c
    for c in (
        EvalCommand("knn", run_knn, r.format_knn, "weighted k-NN on [cls] features (DINO protocol)"),
        EvalCommand(
            "retrieval",
            run_retrieval,
            r.format_retrieval,
            "test images query the train images (faiss): mAP@R, recall@1, recall@5",
        ),
        EvalCommand("probe", run_probe, r.format_probe, "linear probes and patch-token pooling probes (Beyond [cls])"),
        EvalCommand(
            "robustness",
            run_robustness,
            r.format_robustness,
            "a clean-trained probe under 15 CIFAR-10-C corruptions x 5 severities",
        ),
        EvalCommand(
            "dense",
            run_dense,
            r.format_dense,
            "linear segmentation probe on mosaics of labelled images: patch tokens vs [cls]",
        ),
        EvalCommand(
            "finetune",
            run_finetune,
            r.format_finetune,
            "full fine-tuning: layer-wise lr decay, drop path, mixup/cutmix",
        ),
        EvalCommand(
            "cluster",
            run_cluster,
            r.format_cluster,
            "unsupervised classification: k-means on [cls], Hungarian accuracy, NMI, ARI",
        ),
        EvalCommand(
            "lowshot",
            run_lowshot,
            r.format_lowshot,
            "k-NN and logistic regression on 1/5/10 labels per class and 1 %%/10 %% of the labels",
        ),
    )
}
