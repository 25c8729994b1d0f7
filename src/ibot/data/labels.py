"""Labels by name: a test folder's images labelled with the train folder's class indices.

Each labelled folder numbers its classes by its own sorted sub-folder names, so a test folder
that lacks one class (or holds another) numbers the rest differently from the train folder,
and every score comparing the two would be wrong without a word. An evaluation therefore
reads its test folder through ``align_to``: each test class is mapped to the index of the
train class of the same name. A test class the train folder lacks is a one-line error, or,
with ``eval.unknown_test_classes=skip``, its images are left out and listed as skipped (reason
``NOT_IN_TRAIN``). Train classes the test folder lacks are fine.

A train set of one class is refused (``TrainClasses.of``): every prediction would be that
class, a 100 % that says nothing about the weights.

Tar shards have no class names: a shard class is named by its integer label.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch.utils.data import Dataset

from ibot.data.datasets import Sample
from ibot.data.skips import Skip, SkipLog
from ibot.errors import DataError

logger = logging.getLogger(__name__)

NOT_IN_TRAIN = "class not in the train folder"  # the skip reason, in summaries and skip lists
UNKNOWN_POLICIES = ("error", "skip")  # eval.unknown_test_classes


def dataset_classes(dataset: Any) -> tuple[str, ...]:
    """The class names of a labelled dataset by label index: its class folders, or for tar
    shards (and anything else with integer labels alone) the labels themselves."""
    names = getattr(dataset, "classes", None)
    if names is not None:
        return tuple(names)
    top = max((int(label) for label in dataset.labels), default=-1)
    return tuple(str(i) for i in range(top + 1))


def _named(names: Sequence[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@dataclass(frozen=True)
class TrainClasses:
    """The train folder's class names by label index: what a test folder's labels map onto.

    ``unknown``: what a test class absent from them does, "error" or "skip" (its images left
    out and counted), from ``eval.unknown_test_classes``.
    """

    folder: str
    names: tuple[str, ...]
    unknown: str = "error"

    @staticmethod
    def of(source: Any, folder: str, unknown: str, purpose: str) -> TrainClasses:
        """The classes of ``source`` (a dataset or features: ``labels``, maybe ``classes``).

        One line when fewer than 2 classes have images: a one-class score would be 100 %
        whatever the weights.
        """
        labels = [int(label) for label in source.labels]
        present = sorted({label for label in labels if label >= 0})
        names = dataset_classes(source)
        if not present or min(labels) < 0:
            raise DataError(f"{folder}: {purpose} needs labelled images, one sub-folder per class")
        if len(present) < 2:
            raise DataError(
                f"{folder}: {purpose} needs at least 2 classes in the train folder, found only "
                f"{names[present[0]]}: every prediction would be that class (100 % whatever the weights)"
            )
        return TrainClasses(folder, names, unknown)


class Relabelled(Dataset):
    """The images of ``base`` at ``keep``, labelled ``labels`` (indices into ``classes``).

    ``skips`` is the base's log, so what the scan, the decoding and the label mapping left out
    is reported once, together.
    """

    def __init__(self, base: Dataset, keep: list[int], labels: list[int], classes: tuple[str, ...]) -> None:
        self.base = base
        self.keep = keep
        self.labels = tuple(labels)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.keep)

    @property
    def skips(self) -> SkipLog:
        return self.base.skips  # type: ignore[attr-defined, no-any-return]

    @property
    def files(self) -> Sequence[str]:
        return dataset_files(self.base)

    @property
    def transform(self) -> Any:
        return self.base.transform  # type: ignore[attr-defined]

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | Skip:
        i, seed = key if isinstance(key, tuple) else (key, None)
        item = self.base[self.keep[i] if seed is None else (self.keep[i], seed)]
        return item if isinstance(item, Skip) else replace(item, index=i, label=self.labels[i])


def dataset_files(dataset: Any) -> Sequence[str]:
    """The files a dataset reads: an image folder's images, or its tar shards."""
    files = getattr(dataset, "files", None)
    if files is not None:
        return files  # type: ignore[no-any-return]
    return [str(shard) for shard in dataset.shards]


def item_path(dataset: Any, i: int) -> str:
    """Where image ``i`` of an image folder or tar shards is read from, as skip lists name it."""
    if hasattr(dataset, "item_path"):
        return dataset.item_path(i)  # type: ignore[no-any-return]
    entry = dataset.entries[i]  # tar shards: SHARD.tar:MEMBER, as their decoding skips say
    return f"{dataset.shards[entry.shard]}:{entry.name or entry.offset}"


def align_to(dataset: Dataset, folder: str, train: TrainClasses) -> Dataset:
    """``dataset`` (the test folder ``folder``) labelled by the indices of ``train``'s class names.

    A test class ``train`` lacks is a one-line error naming it and both folders, or (``skip``)
    its images are left out and added to the dataset's skips (``NOT_IN_TRAIN``).
    """
    names = dataset_classes(dataset)
    labels = [int(label) for label in dataset.labels]  # type: ignore[attr-defined]
    present = {label for label in labels if label >= 0}
    if len(present) == 1:
        logger.warning(
            "%s: the test folder holds one class (%s): its scores are that class's recall", folder, names[min(present)]
        )
    if names == train.names:
        return dataset
    position = {name: i for i, name in enumerate(train.names)}
    unknown = [name for i, name in enumerate(names) if name not in position and i in present]
    if unknown and train.unknown != "skip":
        raise DataError(
            f"{folder}: test class {_named(unknown)} not in the train folder {train.folder}; "
            "eval.unknown_test_classes=skip leaves their images out"
        )
    mapping = [position.get(name, -1) for name in names]
    keep, mapped, left_out = [], [], []
    for i, label in enumerate(labels):
        if label >= 0 and mapping[label] < 0:
            left_out.append(Skip(item_path(dataset, i), NOT_IN_TRAIN))
        else:  # an unlabelled image stays -1: the command names the folder for it
            keep.append(i)
            mapped.append(mapping[label] if label >= 0 else -1)
    if left_out:
        if not keep:
            raise DataError(f"{folder}: no test class is in the train folder {train.folder}")
        logger.warning(
            "%s: left out %d images of test class %s, not in the train folder %s (eval.unknown_test_classes=skip)",
            folder,
            len(left_out),
            _named(unknown),
            train.folder,
        )
        dataset.skips.extend(left_out)  # type: ignore[attr-defined]
    return Relabelled(dataset, keep, mapped, train.names)
