"""Shared fixtures: tiny configs and image folders made on the fly (no downloads)."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from ibot.config import Config, load_config

torch.set_num_threads(1)


def make_image_folder(
    root: Path, classes: int = 2, per_class: int = 8, size: int = 16, seed: int = 0, noise_seed: int | None = None
) -> Path:
    """Class sub-folders of small PNGs; class c is a noisy image around a class-specific colour.

    ``noise_seed``: other noise around the same class colours as ``seed`` (a held-out split).
    """
    rng = np.random.default_rng(seed)
    other_noise = None if noise_seed is None else np.random.default_rng(noise_seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            noise = rng.integers(-30, 30, size=(size, size, 3))  # drawn either way: same colours
            if other_noise is not None:
                noise = other_noise.integers(-30, 30, size=(size, size, 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def tiny_overrides(data_path: Path, output_dir: Path) -> list[str]:
    """A pico run in seconds, on the CPU even where CUDA is visible (tests/test_cuda.py alone
    overrides train.device): the suite's results must not depend on the machine's GPUs."""
    return [
        "train.device=cpu",
        f"data.path={data_path}",
        "data.index_cache=",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.global_crop_size=16",
        "data.local_crop_size=8",
        "data.num_local_crops=2",
        "model.arch=vit_pico",
        "model.patch_size=4",
        "model.out_dim=32",
        "model.head_hidden_dim=32",
        "model.head_bottleneck_dim=16",
        "model.drop_path_rate=0.0",
        "optim.epochs=2",
        "optim.warmup_epochs=1",
        "optim.freeze_last_layer_epochs=1",
        "loss.warmup_teacher_temp_epochs=1",
        "train.log_every=1",
        "train.checkpoint_every=100",
        "train.precision=fp32",
        f"train.output_dir={output_dir}",
        "eval.crop_ratio=1.0",
    ]


@pytest.fixture
def tiny_config(image_folder: Path, tmp_path: Path) -> Config:
    return load_config(None, tiny_overrides(image_folder, tmp_path / "run"))


def free_port() -> int:
    """A free TCP port on the loopback for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the folder is no package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module
