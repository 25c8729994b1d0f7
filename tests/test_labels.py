"""Labels by name: every evaluation of two folders maps the test classes to the train classes.

Each folder numbers its classes by its own sorted names; a test folder lacking the first class
shifted every label by one and k-NN printed a near-zero score with exit 0. Here the train
folder holds three far-apart class colours and the test folder is a copy of it without
``class_0``, so every command must score (nearly) 100 on it, as on the full copy.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from ibot.cli import main
from ibot.config import load_config
from ibot.data.labels import NOT_IN_TRAIN, TrainClasses, align_to
from ibot.data.shards import TarShards
from ibot.data.skips import read_tsv
from ibot.errors import DataError
from ibot.models.vit import MaskedViT
from ibot.storage import TEACHER_NAME, save_backbone

from conftest import make_image_folder, tiny_overrides

FAST = ["--no-progress", "data.num_workers=0", "eval.probe_lrs=[0.1]", "eval.probe_max_extensions=0"]
# Per command: its fast settings and the score that must be 100 when the labels line up.
COMMANDS = {
    "knn": (["eval.knn_k=[1]"], lambda r: r["knn"]["1"]["top1"]),
    "retrieval": ([], lambda r: r["recall_at_1"]),
    "lowshot": (
        ["eval.lowshot_shots=[1]", "eval.lowshot_fractions=[]", "eval.lowshot_draws=[0]"],
        lambda r: r["lowshot"][0]["knn"]["mean"],
    ),
    "probe": (["eval.probes=[cls]"], lambda r: r["probes"][0]["test_top1"]),
    "dense": (["eval.dense_train_mosaics=40", "eval.dense_test_mosaics=10"], lambda r: r["dense"][0]["test_miou"]),
    "robustness": (["eval.robustness_images=6"], lambda r: r["clean_top1"]),
    "finetune": (
        ["finetune.epochs=15", "finetune.batch_size=6", "finetune.mixup=0", "finetune.cutmix=0", "finetune.lr=2e-2"]
        + ["finetune.num_workers=0"],
        lambda r: r["test_top1"],
    ),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-init pico run, a 3-class train folder, and test copies without / with a class."""
    root = tmp_path_factory.mktemp("labels")
    train = make_image_folder(root / "train", classes=3, per_class=6)
    missing = root / "missing_first"
    shutil.copytree(train, missing)
    shutil.rmtree(missing / "class_0")  # first in sort order: every later label shifted before
    extra = root / "extra"
    shutil.copytree(train, extra)
    shutil.copytree(make_image_folder(root / "other", classes=4, per_class=2, seed=5) / "class_3", extra / "zebra")
    one = root / "one_class"
    shutil.copytree(train / "class_1", one / "class_1")
    cfg = load_config(None, tiny_overrides(train, root / "run"))
    torch.manual_seed(0)
    save_backbone(root / "run" / TEACHER_NAME, MaskedViT.from_config(cfg.model, 16).state_dict(), cfg.to_dict())
    return {"run": root / "run", "train": train, "missing": missing, "extra": extra, "one": one}


def _eval(folders: dict[str, Path], command: str, test: str, *extra: str, train: str = "train") -> int:
    args = ["eval", command, str(folders["run"]), "--train-dir", str(folders[train]), "--test-dir", str(folders[test])]
    return main([*args, *FAST, *COMMANDS[command][0], *extra, "--json", str(folders["run"] / f"{command}.out.json")])


def _result(folders: dict[str, Path], command: str) -> dict:
    return json.loads((folders["run"] / f"{command}.out.json").read_text())


@pytest.mark.parametrize("command", COMMANDS)
def test_a_test_folder_lacking_a_class_scores_by_name(folders: dict[str, Path], command: str) -> None:
    assert _eval(folders, command, "missing") == 0
    score = COMMANDS[command][1](_result(folders, command))
    assert score == 100.0, (command, score)  # today's main: 0.00 (every test label one class off)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_test_class_absent_from_train_is_one_line(
    folders: dict[str, Path], command: str, capsys: pytest.CaptureFixture
) -> None:
    assert _eval(folders, command, "extra") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "zebra" in err and str(folders["extra"]) in err and str(folders["train"]) in err
    assert "eval.unknown_test_classes=skip" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["knn", "probe"])
def test_a_refused_pair_caches_no_feature(folders: dict[str, Path], command: str, tmp_path: Path) -> None:
    """The class check comes before extraction, and a test folder that fails later (nothing decodes)
    leaves the train folder's features uncached: a refusal writes nothing."""
    cache = tmp_path / "cache"
    assert _eval(folders, command, "extra", "--cache-dir", str(cache)) == 2
    broken = tmp_path / "broken" / "class_0"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"not a png")
    folders = {**folders, "broken": broken.parent}
    assert _eval(folders, command, "broken", "--cache-dir", str(cache)) == 2
    assert not cache.exists() or not any(cache.iterdir())
    assert _eval(folders, command, "train", "--cache-dir", str(cache)) == 0
    assert len(list(cache.iterdir())) == 1  # the cache works again (train = test: one key)


@pytest.mark.parametrize("command", COMMANDS)
def test_skip_leaves_the_unknown_class_out_and_counts_it(
    folders: dict[str, Path], command: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert _eval(folders, command, "extra", "eval.unknown_test_classes=skip") == 0
    result = _result(folders, command)
    assert COMMANDS[command][1](result) == 100.0
    assert result["skipped_images"] == 2 and result["skipped_by_reason"] == {NOT_IN_TRAIN: 2}
    listed = read_tsv(folders["run"] / "eval" / f"skipped-{command}.tsv")
    assert sorted(s.path for s in listed) == sorted(str(p) for p in (folders["extra"] / "zebra").iterdir())
    assert any("zebra" in r.message and "left out 2 images" in r.message for r in caplog.records)


def test_unknown_test_classes_is_checked() -> None:
    from ibot.errors import ConfigError

    with pytest.raises(ConfigError, match="^eval.unknown_test_classes: must be error or skip"):
        load_config(None, ["eval.unknown_test_classes=ignore"])


@pytest.mark.parametrize("command", ["knn", "finetune", "dense"])
def test_a_one_class_train_folder_is_refused(
    folders: dict[str, Path], command: str, capsys: pytest.CaptureFixture
) -> None:
    assert _eval(folders, command, "one", train="one") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folders["one"]) in err
    assert "at least 2 classes" in err and "class_1" in err


def test_a_one_class_test_folder_scores_with_a_warning(
    folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert _eval(folders, "knn", "one") == 0
    assert _result(folders, "knn")["knn"]["1"]["top1"] == 100.0  # the train folder holds the same images
    warned = [r.message for r in caplog.records if "one class" in r.message]
    assert len(warned) == 1 and "class_1" in warned[0] and "recall" in warned[0]


def _shards(path: Path, labels: list[int], images: Path) -> Path:
    """One tar of key.png + key.cls, the PNG bytes taken from ``images``."""
    png = next(images.rglob("*.png")).read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, label in enumerate(labels):
            for name, data in ((f"{i:04d}.png", png), (f"{i:04d}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_shard_classes_are_their_integer_labels(folders: dict[str, Path], tmp_path: Path) -> None:
    train = TarShards(_shards(tmp_path / "train.tar", [0, 1, 2, 2], folders["train"]), lambda image: image)
    classes = TrainClasses.of(train, "train.tar", "error", "k-NN")
    assert classes.names == ("0", "1", "2")
    test = TarShards(_shards(tmp_path / "test.tar", [2, 1], folders["train"]), lambda image: image)
    assert align_to(test, "test.tar", classes).labels == (2, 1)
    unknown = TarShards(_shards(tmp_path / "unknown.tar", [1, 3], folders["train"]), lambda image: image)
    with pytest.raises(DataError, match="test class 3 not in the train folder train.tar"):
        align_to(unknown, "unknown.tar", classes)
    kept = align_to(unknown, "unknown.tar", TrainClasses("train.tar", classes.names, "skip"))
    assert kept.labels == (1,) and kept[0].label == 1
    assert [s.reason for s in kept.skips] == [NOT_IN_TRAIN] and kept.skips.sorted()[0].path.endswith(":0001.png")


def test_the_pretraining_knn_monitor_maps_labels_by_name(folders: dict[str, Path]) -> None:
    from ibot.eval.monitor import KNNMonitor
    from ibot.runtime import Runtime

    paths = [f"eval.train_path={folders['train']}", f"eval.test_path={folders['missing']}", "eval.monitor_k=1"]
    cfg = load_config(None, tiny_overrides(folders["train"], folders["run"]) + paths + ["eval.monitor_every_minutes=1"])
    monitor = KNNMonitor(cfg, Runtime.resolve(cfg.train))
    torch.manual_seed(0)
    assert monitor(MaskedViT.from_config(cfg.model, 16))["knn_top1"] == 100.0  # the same images in both
