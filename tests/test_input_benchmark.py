"""benchmarks/input.py: the steady state it reads from a run's metric rows."""

from __future__ import annotations

import pytest

from conftest import load_benchmark


def _load_script():  # type: ignore[no-untyped-def]
    return load_benchmark("input")


def test_steady_state_leaves_out_the_warmup_and_weights_windows_by_time() -> None:
    script = _load_script()
    rows = [  # batch 4; log windows of 2 steps
        {"step": 2, "images_per_second": 1.0, "data_wait_share": 0.9},  # warm-up: 8 s
        {"step": 4, "images_per_second": 8.0, "data_wait_share": 0.5},  # 1 s
        {"step": 6, "images_per_second": 2.0, "data_wait_share": 0.0},  # 4 s
    ]
    images_per_s, wait = script.steady_state(rows, warmup=2, batch=4)
    assert images_per_s == pytest.approx(16 / 5)
    assert wait == pytest.approx(0.5 * 1 / 5)
    with pytest.raises(SystemExit, match="raise --steps"):
        script.steady_state(rows[:1], warmup=2, batch=4)
