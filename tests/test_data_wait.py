"""The data-wait share: time blocked on the loader over wall time, per log window, and the input-bound warning."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import ibot.train.loop as loop
from ibot.config import Config
from ibot.data.collate import Batch
from ibot.train.metrics import read_metrics

SLEEP = 0.1  # seconds per batch: several pico steps, so the slow run is input-bound on any host


def _repeat_first(loader) -> Iterator[Batch]:  # type: ignore[no-untyped-def]
    """The loader's first batch, endlessly: a loader that costs nothing per batch."""
    return itertools.repeat(next(iter(loader)))


def _sleeping(batches: Iterator[Batch], seconds: float) -> Iterator[Batch]:
    for batch in batches:
        time.sleep(seconds)
        yield batch


def _patch_loader(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = loop.build_train_loader

    def build(cfg: Config, *args, **kwargs):  # type: ignore[no-untyped-def]
        loader, dataset = real(cfg, *args, **kwargs)
        batches = _repeat_first(loader)
        return (_sleeping(batches, seconds) if seconds else batches), dataset

    monkeypatch.setattr(loop, "build_train_loader", build)


def _run(cfg: Config, caplog: pytest.LogCaptureFixture) -> tuple[list[dict], list[str]]:
    """8 steps logged every 2: four windows, the first not judged. Returns the rows and the input-bound warnings."""
    cfg = replace(cfg, train=replace(cfg.train, log_every=2))
    with caplog.at_level(logging.WARNING, logger="ibot.train.loop"):
        loop.train(cfg, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "input-bound" in r.getMessage()]
    return read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl"), warnings


def test_slow_loader_shows_in_the_share_and_warns_once(
    tiny_config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _patch_loader(monkeypatch, SLEEP)
    rows, warnings = _run(tiny_config, caplog)
    assert len(rows) == 4
    for row in rows:
        # Each step waited SLEEP (the repeated batch costs nothing else) and took batch / (images/s).
        expected = SLEEP * row["images_per_second"] / tiny_config.data.batch_size
        assert row["data_wait_share"] == pytest.approx(expected, rel=0.15)  # sleep() may overshoot a little
        assert loop.INPUT_BOUND_SHARE <= row["data_wait_share"] <= 1
    assert len(warnings) == 1  # three input-bound windows after the first, one warning
    assert f"{100 * rows[1]['data_wait_share']:.0f} %" in warnings[0]  # the first judged window's share
    assert "data.num_workers=0" in warnings[0] and "data.pipeline=device" in warnings[0]


def test_loader_that_keeps_up_has_no_wait_and_no_warning(
    tiny_config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _patch_loader(monkeypatch, 0.0)
    rows, warnings = _run(tiny_config, caplog)
    assert len(rows) == 4
    assert all(0 <= row["data_wait_share"] < 0.05 for row in rows)
    assert warnings == []
