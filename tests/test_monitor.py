"""k-NN monitor during pre-training, and the training clock that leaves it out."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ibot.config import Config, load_config
from ibot.errors import ConfigError, IBOTError
from ibot.eval.monitor import KNNMonitor
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime
from ibot.train.loop import TrainClock, train
from ibot.train.metrics import read_metrics

from conftest import make_image_folder, tiny_overrides


def _monitored(image_folder: Path, tmp_path: Path, *extra: str) -> Config:
    return load_config(
        None,
        tiny_overrides(image_folder, tmp_path / "run")
        + [f"eval.train_path={image_folder}", f"eval.test_path={image_folder}", "eval.monitor_k=3", *extra],
    )


def test_clock_leaves_out_paused_time() -> None:
    # On the real clock; bounded by what the test itself timed, not by a guess of the host's speed.
    slept: list[float] = []

    def nap(seconds: float) -> str:
        t0 = time.monotonic()
        time.sleep(seconds)
        slept.append(time.monotonic() - t0)
        return "done"

    start = time.monotonic()
    clock = TrainClock()
    assert clock.pause_during(nap, 0.3) == "done"
    counted = clock.minutes() * 60
    outside = time.monotonic() - start - slept[0]  # all the time the clock may count, and more
    assert 0 <= counted <= outside  # 0.3 s or more slept, none of it counted
    time.sleep(0.2)
    assert clock.minutes() * 60 >= 0.2  # unpaused time is counted (a clock stuck at 0 is not a clock)


def test_clock_counts_exactly_the_unpaused_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake monotonic clock (in whichever module TrainClock lives), so the arithmetic is
    # checked exactly and no speed matters.
    import sys
    import types

    now = [100.0]
    monkeypatch.setattr(sys.modules[TrainClock.__module__], "time", types.SimpleNamespace(monotonic=lambda: now[0]))

    def advance(seconds: float, fail: bool = False) -> str:
        now[0] += seconds
        if fail:
            raise RuntimeError("monitor failed")
        return "done"

    clock = TrainClock()
    advance(30)
    assert clock.minutes() == pytest.approx(0.5)
    assert clock.pause_during(advance, 45) == "done"
    assert clock.minutes() == pytest.approx(0.5)
    advance(15)
    assert clock.minutes() == pytest.approx(0.75)
    with pytest.raises(RuntimeError):
        clock.pause_during(advance, 600, True)  # a failed pause is still left out
    assert clock.minutes() == pytest.approx(0.75)
    resumed = TrainClock(already=2.0)  # a resumed run continues from its earlier training time
    assert resumed.minutes() == pytest.approx(2.0)
    advance(60)
    assert resumed.minutes() == pytest.approx(3.0)


def test_monitor_scores_a_separable_folder_perfectly(tmp_path: Path) -> None:
    # Two flat colours per class, 12 images each: any backbone that does not map them to one
    # point separates them; a random-init pico ViT does.
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=12)
    cfg = _monitored(folder, tmp_path, "eval.monitor_train_images=16", "eval.monitor_test_images=8")
    monitor = KNNMonitor(cfg, Runtime.resolve(cfg.train))
    assert monitor.train_images.shape == (16, 3, 16, 16) and monitor.test_images.shape[0] == 8
    torch.manual_seed(0)
    backbone = MaskedViT("vit_pico", 4, 16)
    backbone.train()
    scores = monitor(backbone)
    assert scores["knn_top1"] == pytest.approx(100.0)
    assert backbone.training  # the monitor restores the mode it found


def test_monitor_evaluates_at_eval_image_size(tmp_path: Path) -> None:
    # Pre-trained on 16 px global crops, evaluated on 32 px images: the position embeddings are
    # resampled to the larger grid, and the separable folder is still scored perfectly.
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=12, size=32)
    cfg = _monitored(
        folder, tmp_path, "eval.monitor_train_images=16", "eval.monitor_test_images=8", "eval.image_size=32"
    )
    assert cfg.data.global_crop_size == 16 and cfg.eval_image_size == 32
    monitor = KNNMonitor(cfg, Runtime.resolve(cfg.train))
    assert monitor.train_images.shape == (16, 3, 32, 32)
    torch.manual_seed(0)
    assert monitor(MaskedViT("vit_pico", 4, 16))["knn_top1"] == pytest.approx(100.0)
    assert replace(cfg, eval=replace(cfg.eval, image_size=0)).eval_image_size == 16  # 0: the crop's
    with pytest.raises(ConfigError, match="eval.image_size"):
        replace(cfg.eval, image_size=-1)


def test_monitor_subset_is_fixed(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "imgs", classes=3, per_class=10)
    cfg = _monitored(folder, tmp_path, "eval.monitor_train_images=7", "eval.monitor_test_images=5")
    runtime = Runtime.resolve(cfg.train)
    a, b = KNNMonitor(cfg, runtime), KNNMonitor(cfg, runtime)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_images[:5], a.test_images)  # train and test draws differ


def test_run_logs_knn_at_start_and_end(image_folder: Path, tmp_path: Path) -> None:
    cfg = _monitored(image_folder, tmp_path, "eval.monitor_every_minutes=1000")
    result = train(cfg, progress=False, monitor=KNNMonitor)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "knn_top1" in r]
    assert [r["step"] for r in rows] == [0, result.step]
    assert result.knn_top1 == rows[-1]["knn_top1"]
    assert 0 <= result.knn_top1 <= 100


def test_run_logs_knn_every_so_many_steps(image_folder: Path, tmp_path: Path) -> None:
    cfg = _monitored(image_folder, tmp_path, "eval.monitor_every_steps=3")
    train(cfg, progress=False, monitor=KNNMonitor)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "knn_top1" in r]
    assert [r["step"] for r in rows] == [0, 3, 6, 8]  # the start, every 3 steps, the end
    with pytest.raises(ConfigError, match="eval.monitor_every_steps: set it or eval.monitor_every_minutes"):
        _monitored(image_folder, tmp_path, "eval.monitor_every_steps=3", "eval.monitor_every_minutes=1")


def test_monitor_needs_labelled_folders(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    make_image_folder(tmp_path / "src", classes=1, per_class=4)
    (tmp_path / "src" / "class_0").rename(flat)
    cfg = load_config(
        None,
        tiny_overrides(flat, tmp_path / "run")
        + [f"eval.train_path={flat}", f"eval.test_path={flat}", "eval.monitor_every_minutes=1"],
    )
    with pytest.raises(IBOTError, match="labelled"):
        KNNMonitor(cfg, Runtime.resolve(cfg.train))
    with pytest.raises(IBOTError, match="eval.train_path"):
        KNNMonitor(replace(cfg, eval=replace(cfg.eval, train_path="")), Runtime.resolve(cfg.train))


def test_monitor_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="eval.monitor_every_minutes"):
        load_config(None, ["eval.monitor_every_minutes=-1"])
    with pytest.raises(ConfigError, match="eval.monitor_k"):
        load_config(None, ["eval.monitor_k=0"])


def test_train_without_a_monitor_refuses_a_monitored_config(image_folder: Path, tmp_path: Path) -> None:
    cfg = _monitored(image_folder, tmp_path, "eval.monitor_every_minutes=1000")
    with pytest.raises(ConfigError, match="gave no monitor"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
