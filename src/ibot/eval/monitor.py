"""k-NN monitor for pre-training: a fixed labelled subset, decoded once, scored on the teacher.

Gives the run's metrics a learning curve of the quantity people judge pre-training by
(DINO's weighted k-NN on [cls]) at a cost of seconds: the subset is small and its eval
transform is applied once, so each call is one frozen forward pass plus a matrix product.
"""

from __future__ import annotations

import torch

from ibot.config import Config
from ibot.data.labels import TrainClasses
from ibot.data.skips import SkipLog
from ibot.errors import IBOTError
from ibot.eval.features import build_eval_dataset, cls_features, dataset_skips, labelled_subset, train_classes
from ibot.eval.knn import knn_classify
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime


def _load_subset(
    folder: str, size: int, cfg: Config, seed: int, skips: SkipLog, train: TrainClasses | None = None
) -> tuple[torch.Tensor, torch.Tensor, TrainClasses]:
    """``size`` images of ``folder`` drawn with ``seed`` (all if fewer), as (X, C, S, S) and labels (X,),
    and the folder's classes; with ``train`` (the test folder) the labels are its class indices.

    What the folder's scan and the drawn images' decoding left out goes into ``skips``.
    """
    dataset = build_eval_dataset(folder, cfg, train)
    samples = labelled_subset(dataset, folder, size, seed, "the k-NN monitor")
    skips.extend(dataset_skips(dataset))
    classes = train if train is not None else train_classes(dataset, folder, cfg, "the k-NN monitor")
    return torch.stack([s.view for s in samples]), torch.tensor([s.label for s in samples]), classes


class KNNMonitor:
    """``monitor(backbone)`` -> {"knn_top1": %, "knn_top5": %} at k = ``eval.monitor_k``.

    ``skips``: the files of the two folders that were left out (the trainer reports them).
    """

    def __init__(self, cfg: Config, runtime: Runtime) -> None:
        e = cfg.eval
        if not e.train_path or not e.test_path:
            raise IBOTError(
                "the k-NN monitor (eval.monitor_every_minutes / _steps) needs eval.train_path and eval.test_path"
            )
        self.skips = SkipLog()
        self.train_images, self.train_labels, classes = _load_subset(
            e.train_path, e.monitor_train_images, cfg, 0, self.skips
        )
        self.test_images, self.test_labels, _ = _load_subset(
            e.test_path, e.monitor_test_images, cfg, 1, self.skips, classes
        )
        self.k = e.monitor_k
        self.temperature = e.knn_temperature
        self.batch_size = e.batch_size
        self.runtime = runtime

    def __call__(self, backbone: MaskedViT) -> dict[str, float]:
        was_training = backbone.training
        backbone.eval()
        try:
            train = cls_features(backbone, self.train_images, self.runtime, self.batch_size)
            test = cls_features(backbone, self.test_images, self.runtime, self.batch_size)
        finally:
            backbone.train(was_training)
        top1, top5 = knn_classify(train, self.train_labels, test, self.test_labels, (self.k,), self.temperature)[self.k]
        return {"knn_top1": top1, "knn_top5": top5}
