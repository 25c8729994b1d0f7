"""torchrun + DDP (gloo on CPU) gives the same training as one process with the same global batch."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ibot.config import load_config
from ibot.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from ibot.train.loop import train
from ibot.train.metrics import read_metrics

from conftest import tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
def test_two_process_ddp_matches_one_process(image_folder: Path, tmp_path: Path, centering: str) -> None:
    # Both centerings reduce over the global batch: sums for EMA, every Sinkhorn-Knopp marginal.
    common = tiny_overrides(image_folder, tmp_path / "unused")
    common += [f"loss.cls_centering={centering}", f"loss.patch_centering={centering}"]
    single = load_config(None, common + ["data.batch_size=8", f"train.output_dir={tmp_path / 'single'}"])
    train(single, progress=False)

    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "ibot",
        "pretrain",
        "--config",
        str(config),
        "--no-progress",
        *common,
        "data.batch_size=4",
        f"train.output_dir={tmp_path / 'ddp'}",
        "train.threads=1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    single_rows = read_metrics(tmp_path / "single" / "metrics.jsonl")
    ddp_rows = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in single_rows] == [1, 2, 3, 4]
    for a, b in zip(single_rows, ddp_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    a = load_checkpoint(tmp_path / "single" / CHECKPOINT_NAME)["method"]
    b = load_checkpoint(tmp_path / "ddp" / CHECKPOINT_NAME)["method"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
