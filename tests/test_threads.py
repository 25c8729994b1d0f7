"""The ``ibot`` command lets waiting OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ibot.cli import main


def test_main_sets_a_passive_wait_policy_unless_one_is_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "")  # recorded, so that teardown restores the real value
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert main(["report", str(tmp_path / "missing")]) == 2  # any command, even one that fails
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice stands


def test_the_policy_is_set_before_torch_loads(tmp_path: Path) -> None:
    # libgomp reads it once, when torch loads: OMP_DISPLAY_ENV=VERBOSE prints the spin count it took
    # (0 for PASSIVE, 300000 by default). A pretrain that fails on its data has loaded torch.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    cmd = [sys.executable, "-m", "ibot", "pretrain", "--config", str(config), "--no-progress"]
    cmd += [f"data.path={tmp_path / 'missing'}", f"train.output_dir={tmp_path / 'run'}", "train.device=cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "ibot: error:" in done.stderr, done.stderr[-2000:]
    spin = [line.strip() for line in done.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    if not spin:
        pytest.skip("torch's OpenMP runtime is not libgomp: it does not display GOMP_SPINCOUNT")
    assert spin == ["GOMP_SPINCOUNT = '0'"]


def test_the_benchmark_weights_windows_by_time_and_leaves_out_the_first() -> None:
    from conftest import load_benchmark

    script = load_benchmark("threads")
    rows = [  # batch 4, log windows of 2 steps
        {"step": 2, "images_per_second": 1.0, "data_wait_share": 0.9},  # start-up: left out
        {"step": 4, "images_per_second": 8.0, "data_wait_share": 0.5},  # 1 s
        {"step": 6, "images_per_second": 2.0, "data_wait_share": 0.0},  # 4 s
    ]
    images_per_s, wait = script.steady_state(rows, log_every=2, batch=4)
    assert images_per_s == pytest.approx(16 / 5)
    assert wait == pytest.approx(0.5 * 1 / 5)
    assert script.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
