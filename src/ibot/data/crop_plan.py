"""The CPU half of ``data.pipeline=device``: an image's crop geometry and augmentation parameters,
all drawn from its seed, a decode at reduced size where the crops allow, and uint8 crops.

Per image the worker does only what must happen before the pixels reach the device: read and
decode the file, and cut the 2 global + n local random-resized crops (bicubic, antialiased)
to their output sizes. The crop boxes are drawn first, from the stored size in the header, so
a JPEG is decoded at the largest DCT scale (1/2, 1/4, 1/8) at which every box still has at
least as many pixels as its output: a crop is never upsampled further than in a full decode.
The photometric parameters of every crop are drawn here too and applied on the device
(``ibot.data.photometric``).

An image read at full precision (16-bit, N channels: ``ibot.data.reading``) arrives whole as an
(H, W, C) float32 array in [0, 1]: the same boxes are cut from it and resized in float, giving
float32 crops of C channels.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ibot.config import DataConfig
from ibot.data.crops import Crops
from ibot.data.photometric import CropKind, crop_kinds, draw_photometric

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range


@dataclass(frozen=True)
class Box:
    """A crop in stored-image pixels: top, left, height, width, and the output side it is resized to."""

    top: int
    left: int
    height: int
    width: int
    size: int


def random_resized_box(width: int, height: int, scale: tuple[float, float], rng: random.Random) -> tuple[int, ...]:
    """torchvision's ``RandomResizedCrop.get_params`` (10 tries, then a centre crop) with ``rng``."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class CropPlan:
    """Everything random about one image's crops: boxes in stored pixels and parameter rows."""

    stored_size: tuple[int, int]  # (width, height) from the file's header
    boxes: tuple[Box, ...]  # global crops first, then local crops
    params: torch.Tensor  # (crops, photometric.NUM_PARAMS)

    def draft_size(self) -> tuple[int, int]:
        """The smallest decoded size at which every box keeps at least its output's pixels."""
        reduction = max(1.0, min(min(b.width, b.height) / b.size for b in self.boxes))
        width, height = self.stored_size
        return max(1, math.ceil(width / reduction)), max(1, math.ceil(height / reduction))


class DeviceMultiCrop:
    """image seed + stored size -> ``CropPlan``; decoded image + plan -> ``Crops`` with parameters
    (uint8 from 8-bit RGB pixels, float32 in [0, 1] from a full-precision array)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        first, second, local = crop_kinds(cfg)
        self.kinds: tuple[CropKind, ...] = (first, second) + (local,) * cfg.num_local_crops
        self.num_global = 2

    def plan(self, stored_size: tuple[int, int], seed: int) -> CropPlan:
        """All random draws for an image, a pure function of its seed and stored size."""
        rng = random.Random(seed)
        width, height = stored_size
        boxes, rows = [], []
        for i, kind in enumerate(self.kinds):
            is_global = i < self.num_global
            scale = self.cfg.global_crop_scale if is_global else self.cfg.local_crop_scale
            size = self.cfg.global_crop_size if is_global else self.cfg.local_crop_size
            boxes.append(Box(*random_resized_box(width, height, scale, rng), size))
            rows.append(draw_photometric(self.cfg, kind, rng))
        return CropPlan(stored_size, tuple(boxes), torch.tensor(rows, dtype=torch.float32))

    def cut(self, pixels: np.ndarray, plan: CropPlan) -> Crops:
        """The plan's crops of ``pixels``: (H, W, 3) uint8 RGB (at the stored size or a DCT-reduced
        one) -> uint8 crops, or (H, W, C) float32 in [0, 1] (whole) -> float32 crops of C channels."""
        with warnings.catch_warnings():
            # A read-only view of the decoder's buffer (no copy); nothing writes to it.
            warnings.simplefilter("ignore", UserWarning)
            # (1, C, H, W) with channels-last strides: torch's fast uint8 antialiased resize path.
            image = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
        if image.dtype != torch.uint8:
            # float32, not float16: half precision keeps 11 significant bits, a step of 1/2048 near 1,
            # and would lose the 12-16 bits the array was read at.
            image = image.float()
        sx, sy = image.shape[3] / plan.stored_size[0], image.shape[2] / plan.stored_size[1]
        crops = []
        for b in plan.boxes:
            top, left = int(b.top * sy), int(b.left * sx)
            height, width = max(1, round(b.height * sy)), max(1, round(b.width * sx))
            region = image[:, :, top : top + height, left : left + width]
            crop = F.interpolate(region, size=(b.size, b.size), mode="bicubic", antialias=True)[0]
            # uint8 saturates; bicubic overshoot in float is clamped back into the intensity range.
            crops.append(crop if image.dtype == torch.uint8 else crop.clamp_(0, 1))
        g = self.num_global
        side, channels = self.cfg.local_crop_size, image.shape[1]
        empty = torch.empty(0, channels, side, side, dtype=image.dtype)
        local = torch.stack(crops[g:]) if len(crops) > g else empty
        return Crops(torch.stack(crops[:g]), local, plan.params[:g], plan.params[g:])
