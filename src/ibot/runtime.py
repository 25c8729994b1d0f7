"""Device, precision and attention choices, made once per run from the config and hardware."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ibot.config import TrainConfig
from ibot.errors import ConfigError


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


@dataclass(frozen=True)
class Runtime:
    """Where and how the step runs: device, autocast dtype (None = fp32), loss scaling, attention
    and the dtype of the backbone's residual stream (None = fp32)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    use_scaler: bool
    attention: str
    residual_dtype: torch.dtype | None = None

    @staticmethod
    def resolve(cfg: TrainConfig) -> Runtime:
        if cfg.device == "auto":
            # Under torchrun each process takes the GPU of its LOCAL_RANK.
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            try:
                device = torch.device(cfg.device)
            except RuntimeError:
                raise ConfigError(f"train.device: unknown device {cfg.device!r}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError("train.device: CUDA requested but not available")
        precision = cfg.precision
        if precision == "auto":
            if device.type == "cuda":
                precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            else:
                precision = "bf16" if cpu_has_bf16() else "fp32"
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision: fp16 needs CUDA; use bf16 or fp32 on CPU")
        amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        attention = cfg.attention
        if attention == "auto":
            # Measured on a 2-core AVX512-BF16 CPU: SDPA's bf16 backward is 2-7x slower than
            # explicit attention for ViT shapes; elsewhere the fused kernel wins.
            attention = "explicit" if device.type == "cpu" and amp_dtype is torch.bfloat16 else "sdpa"
        residual = cfg.residual_precision
        if residual == "auto":
            # Measured on a 2-core AVX512-BF16 CPU (benchmarks/step.py): the bf16 step up to
            # 14 % faster and its peak memory 6-12 % lower; not measured on GPUs yet.
            residual = "amp" if device.type == "cpu" and amp_dtype is torch.bfloat16 else "fp32"
        residual_dtype = amp_dtype if residual == "amp" else None
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return Runtime(device, amp_dtype, precision == "fp16", attention, residual_dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
