"""The CUDA paths: bf16 and fp16 + loss scaling, both attention kernels, resume, torchrun over NCCL.

Skipped where no GPU is visible (CI); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ibot.config import load_config
from ibot.storage import CHECKPOINT_NAME, load_checkpoint
from ibot.train.loop import train
from ibot.train.metrics import read_metrics

from conftest import tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_overrides(images: Path, out: Path, precision: str, device: str = "cuda") -> list[str]:
    return tiny_overrides(images, out) + [f"train.device={device}", f"train.precision={precision}"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_gives_finite_losses_and_moves_the_teacher(
    image_folder: Path, tmp_path: Path, precision: str
) -> None:
    cfg = load_config(None, _cuda_overrides(image_folder, tmp_path / "run", precision))
    result = train(cfg, progress=False)
    assert result.step == 8
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_patch"]) for r in rows)
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)  # mapped to the CPU
    assert all(t.device.type == "cpu" for t in state["method"].values())
    # fp16 trains through a GradScaler whose state is checkpointed; bf16 / fp32 need none
    assert bool(state["scaler"]) == (precision == "fp16")
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_and_explicit_attention_agree_on_cuda(dtype: torch.dtype) -> None:
    from ibot.models.vit import MaskedViT

    torch.manual_seed(0)
    vit = MaskedViT("vit_pico", patch_size=4, img_size=16).cuda().eval()
    images = torch.randn(4, 3, 16, 16, device="cuda")
    outputs = {}
    for attention in ("sdpa", "explicit"):
        vit.set_attention(attention)
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            outputs[attention] = vit(images).cls.float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(outputs["sdpa"], outputs["explicit"], atol=tol, rtol=tol)


def test_resume_on_cuda_matches_an_uninterrupted_run(image_folder: Path, tmp_path: Path) -> None:
    """Same schedules and (to GPU float tolerance) the same weights after stop + resume."""
    full_cfg = load_config(None, _cuda_overrides(image_folder, tmp_path / "full", "fp32"))
    part_cfg = load_config(None, _cuda_overrides(image_folder, tmp_path / "part", "fp32"))
    train(full_cfg, progress=False)
    train(replace(part_cfg, train=replace(part_cfg.train, max_steps=3)), progress=False)
    assert train(part_cfg, resume=True, progress=False).step == 8
    full = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)["method"]
    part = load_checkpoint(tmp_path / "part" / CHECKPOINT_NAME)["method"]
    for key in full:
        assert torch.allclose(full[key].float(), part[key].float(), atol=1e-4, rtol=1e-3), key


def test_torchrun_over_nccl_trains(image_folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    overrides = _cuda_overrides(image_folder, tmp_path / "ddp", "bf16", device="auto")  # cuda:LOCAL_RANK
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += ["-m", "ibot", "pretrain", "--config", str(config), "--no-progress", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 process(es), device cuda:0" in done.stderr + done.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl")] == list(range(1, 9))


def test_device_pipeline_augments_on_cuda_as_on_the_cpu(image_folder: Path, tmp_path: Path) -> None:
    """The same uint8 crops and parameters give the same augmented crops on CUDA as on the CPU
    (float tolerance), and a run with data.pipeline=device trains on CUDA."""
    from ibot.data.loaders import build_train_loader
    from ibot.data.photometric import DeviceAugment

    overrides = _cuda_overrides(image_folder, tmp_path / "run", "bf16") + ["data.pipeline=device"]
    cfg = load_config(None, overrides + ["data.global_blur_prob=[1.0,1.0]", "data.color_jitter=[0.4,0.4,0.2,0.1]"])
    batch = next(iter(build_train_loader(cfg)[0]))
    augment = DeviceAugment(cfg.data)
    on_cpu, on_cuda = augment(batch), augment(batch.to("cuda"))
    assert on_cuda.global_crops.is_cuda and on_cuda.global_crops.dtype == torch.float32
    for a, b in ((on_cpu.global_crops, on_cuda.global_crops), (on_cpu.local_crops, on_cuda.local_crops)):
        assert torch.allclose(a, b.cpu(), atol=1e-4), (a - b.cpu()).abs().max()
    assert train(cfg, progress=False).step == 8
