"""The data-wait share: time blocked on the loader over wall time, per log window; the input-bound
warning, and the warning for a step-time jump that the data wait does not explain.

The loop reads a fake clock here: the loader "waits" and each step "costs" fixed seconds of it,
so every share and pace is exact and no test depends on the host's speed or load.
"""

from __future__ import annotations

import itertools
import logging
import types
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import ibot.train.loop as loop
from ibot.config import Config
from ibot.data.collate import Batch
from ibot.train.metrics import read_metrics

SLEEP = 0.1  # clock seconds the loader blocks per batch
STEP = 0.025  # clock seconds a training step costs: a wait share of 0.1 / 0.125 = 0.8


class FakeClock:
    """The loop's ``time.monotonic``: advances only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _repeat_first(loader) -> Iterator[Batch]:  # type: ignore[no-untyped-def]
    """The loader's first batch, endlessly: a loader that costs nothing per batch."""
    return itertools.repeat(next(iter(loader)))


def _waiting(batches: Iterator[Batch], clock: FakeClock, waits: Iterator[float]) -> Iterator[Batch]:
    for batch, seconds in zip(batches, waits):
        clock.advance(seconds)
        yield batch


def _patch_loop(
    monkeypatch: pytest.MonkeyPatch, waits: float | Iterator[float], step_costs: Iterator[float] | None = None
) -> None:
    """The loop on a fake clock: batch i waits the i-th of ``waits`` seconds (or ``waits`` each), step i
    costs the i-th of ``step_costs`` (STEP each by default)."""
    clock = FakeClock()
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    wait_times = itertools.repeat(waits) if isinstance(waits, float) else waits
    costs = step_costs if step_costs is not None else itertools.repeat(STEP)
    real_build, real_step = loop.build_train_loader, loop._train_step

    def build(cfg: Config, *args, **kwargs):  # type: ignore[no-untyped-def]
        loader, dataset = real_build(cfg, *args, **kwargs)
        return _waiting(_repeat_first(loader), clock, wait_times), dataset

    def step(*args, **kwargs):  # type: ignore[no-untyped-def]
        clock.advance(next(costs))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "build_train_loader", build)
    monkeypatch.setattr(loop, "_train_step", step)


def _run(cfg: Config, caplog: pytest.LogCaptureFixture, about: str = "input-bound") -> tuple[list[dict], list[str]]:
    """8 steps logged every 2: four windows, the first not judged. Returns the rows and the warnings ``about``."""
    cfg = replace(cfg, train=replace(cfg.train, log_every=2))
    with caplog.at_level(logging.WARNING, logger="ibot.train.loop"):
        loop.train(cfg, progress=False)
    return read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl"), _run_warnings(caplog, about)


def _run_warnings(caplog: pytest.LogCaptureFixture, about: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if about in r.getMessage()]


def test_slow_loader_shows_in_the_share_and_warns_once(
    tiny_config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _patch_loop(monkeypatch, SLEEP)
    rows, warnings = _run(tiny_config, caplog)
    assert len(rows) == 4
    for row in rows:
        # Each step waited SLEEP (the repeated batch costs nothing else) and took batch / (images/s).
        expected = SLEEP * row["images_per_second"] / tiny_config.data.batch_size
        assert row["data_wait_share"] == pytest.approx(expected)
        assert row["data_wait_share"] == pytest.approx(SLEEP / (SLEEP + STEP))  # the step's own time is not a wait
        assert row["images_per_second"] == pytest.approx(tiny_config.data.batch_size / (SLEEP + STEP))
        assert loop.INPUT_BOUND_SHARE <= row["data_wait_share"] <= 1
    assert len(warnings) == 1  # three input-bound windows after the first, one warning
    assert f"{100 * rows[1]['data_wait_share']:.0f} %" in warnings[0]  # the first judged window's share
    assert "data.num_workers=0" in warnings[0] and "data.pipeline=device" in warnings[0]


def test_loader_that_keeps_up_has_no_wait_and_no_warning(
    tiny_config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _patch_loop(monkeypatch, 0.0)
    rows, warnings = _run(tiny_config, caplog)
    assert len(rows) == 4
    assert all(row["data_wait_share"] == 0 for row in rows)
    assert all(row["images_per_second"] == pytest.approx(tiny_config.data.batch_size / STEP) for row in rows)
    assert warnings == []


def test_a_step_time_jump_without_more_data_wait_warns_once(
    tiny_config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Windows of steps 1-2 (not judged), 3-4 (the pace before), then 5-6 and 7-8 at 5x the step cost:
    # as when another process takes a core the intra-op threads need.
    _patch_loop(monkeypatch, 0.0, iter([STEP] * 4 + [5 * STEP] * 4))
    rows, warnings = _run(tiny_config, caplog, about="longer than before")
    assert [r["images_per_second"] for r in rows] == pytest.approx([160, 160, 32, 32])
    assert warnings == [
        "step 8: steps take 5.0x longer than before while the data wait did not grow (0 % of the time): "
        "another process may be competing for the CPU cores; try train.threads=1"
    ]


def test_a_step_time_jump_that_the_data_wait_explains_is_left_to_the_input_warning(
    tiny_config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The loader, not the step, slows down from step 5 (steps 5x as long again): input-bound, not a busy core.
    _patch_loop(monkeypatch, iter([0.0] * 4 + [4 * STEP] * 4))
    rows, warnings = _run(tiny_config, caplog, about="longer than before")
    assert [r["images_per_second"] for r in rows] == pytest.approx([160, 160, 32, 32])
    assert warnings == []
    assert len(_run_warnings(caplog, "input-bound")) == 1
