"""torchrun + DDP (gloo on CPU) gives the same training as one process with the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ibot.config import load_config
from ibot.storage import CHECKPOINT_NAME, load_checkpoint
from ibot.train.loop import train
from ibot.train.metrics import read_metrics

from conftest import free_port, tiny_overrides


def _torchrun_pretrain(tmp_path: Path, overrides: list[str]) -> None:
    """``torchrun --nproc_per_node 2 -m ibot pretrain`` on the CPU (gloo), one thread per process.

    Pinned to the CPU (after the caller's overrides, so it wins): with train.device=auto
    rank 1 would take cuda:1, which a one-GPU machine does not have.
    """
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
        str(free_port()),
        "-m",
        "ibot",
        "pretrain",
        "--config",
        str(config),
        "--no-progress",
        *overrides,
        "train.threads=1",
        "train.device=cpu",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_same_training(tmp_path: Path, single: str, parallel: str) -> None:
    """Same steps, losses and schedules, and to float tolerance the same final weights."""
    single_rows = read_metrics(tmp_path / single / "metrics.jsonl")
    ddp_rows = read_metrics(tmp_path / parallel / "metrics.jsonl")
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in single_rows] == [1, 2, 3, 4]
    for a, b in zip(single_rows, ddp_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    a = load_checkpoint(tmp_path / single / CHECKPOINT_NAME)["method"]
    b = load_checkpoint(tmp_path / parallel / CHECKPOINT_NAME)["method"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


@pytest.mark.parametrize("centering, pipeline", [("ema", "pil"), ("sinkhorn_knopp", "pil"), ("ema", "device")])
def test_two_process_ddp_matches_one_process(image_folder: Path, tmp_path: Path, centering: str, pipeline: str) -> None:
    # Both centerings reduce over the global batch: sums for EMA, every Sinkhorn-Knopp marginal.
    # The device pipeline draws its augmentations from each image's seed like the PIL one.
    common = tiny_overrides(image_folder, tmp_path / "unused")
    common += [f"loss.cls_centering={centering}", f"loss.patch_centering={centering}", f"data.pipeline={pipeline}"]
    single = load_config(None, common + ["data.batch_size=8", f"train.output_dir={tmp_path / 'single'}"])
    train(single, progress=False)
    _torchrun_pretrain(tmp_path, common + ["data.batch_size=4", f"train.output_dir={tmp_path / 'ddp'}"])
    _assert_same_training(tmp_path, "single", "ddp")


def test_two_process_ddp_freezes_the_backbone_like_one_process(image_folder: Path, tmp_path: Path) -> None:
    """optim.freeze_backbone_epochs under DDP: the backbone's gradients are reduced and dropped (one
    process skips its backward instead); the backbones stay as built, the heads train alike."""
    from ibot.method import IBOT

    common = tiny_overrides(image_folder, tmp_path / "unused") + ["optim.freeze_backbone_epochs=1", "train.max_steps=2"]
    single = load_config(None, common + ["data.batch_size=8", f"train.output_dir={tmp_path / 'single'}"])
    train(single, progress=False)
    _torchrun_pretrain(tmp_path, common + ["data.batch_size=4", f"train.output_dir={tmp_path / 'ddp'}"])
    torch.manual_seed(single.train.seed)  # every rank builds this IBOT before anything else draws
    built = IBOT(single.model, single.loss, 16, single.mim).state_dict()
    a = load_checkpoint(tmp_path / "single" / CHECKPOINT_NAME)["method"]
    b = load_checkpoint(tmp_path / "ddp" / CHECKPOINT_NAME)["method"]
    for key in built:
        if ".backbone." in key:
            assert torch.equal(b[key], built[key]), key
        else:
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    assert not torch.equal(b["student.head.mlp.0.weight"], built["student.head.mlp.0.weight"])
    # At lr 0 a step would leave the weights too: AdamW must not have seen the backbone at all.
    optimizer = load_checkpoint(tmp_path / "ddp" / CHECKPOINT_NAME)["optimizer"]
    backbone = [i for g in optimizer["param_groups"] if g["is_backbone"] for i in g["params"]]
    assert backbone and not any(i in optimizer["state"] for i in backbone)


def test_two_process_fsdp_matches_one_process_across_a_resume(image_folder: Path, tmp_path: Path) -> None:
    """FSDP2: 2 steps, a gathered checkpoint, a resume that re-shards it, 2 more steps == 4 steps in one process."""
    common = tiny_overrides(image_folder, tmp_path / "unused")
    single = load_config(None, common + ["data.batch_size=8", f"train.output_dir={tmp_path / 'single'}"])
    train(single, progress=False)
    sharded = common + ["data.batch_size=4", f"train.output_dir={tmp_path / 'fsdp'}", "train.parallel=fsdp"]
    _torchrun_pretrain(tmp_path, sharded + ["train.max_steps=2"])
    state = load_checkpoint(tmp_path / "fsdp" / CHECKPOINT_NAME)
    assert state["step"] == 2 and state["optimizer_keys"] == "names"
    # gathered, not sharded: every tensor has its full shape
    full = load_checkpoint(tmp_path / "single" / CHECKPOINT_NAME)["method"]
    assert {k: v.shape for k, v in state["method"].items()} == {k: v.shape for k, v in full.items()}
    _torchrun_pretrain(tmp_path, sharded + ["--resume"])
    _assert_same_training(tmp_path, "single", "fsdp")


def test_submit_through_submitit_trains_like_one_process(image_folder: Path, tmp_path: Path) -> None:
    """``ibot submit --local``: submitit's job script, 2 tasks, env:// rendezvous from JobEnvironment."""
    from ibot.cli import main

    common = tiny_overrides(image_folder, tmp_path / "unused")
    train(load_config(None, common + ["data.batch_size=8", f"train.output_dir={tmp_path / 'single'}"]), progress=False)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    args = ["submit", "--config", str(config), "--local", "--tasks-per-node", "2", "--wait"]
    job = ["data.batch_size=4", f"train.output_dir={tmp_path / 'job'}", "train.threads=1", "train.device=cpu"]
    assert main(args + common + job) == 0
    assert any("2 process(es)" in log.read_text() for log in (tmp_path / "job" / "slurm").glob("*_0_log.err"))
    _assert_same_training(tmp_path, "single", "job")
