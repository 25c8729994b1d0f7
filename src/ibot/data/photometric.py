"""The device half of ``data.pipeline=device``: flip, colour jitter, grayscale, blur, solarize and
normalisation, batched on the training device over uint8 or float crops, each crop with its own
parameters. (``data.pipeline=pil`` applies the same to crops cut from full-precision arrays, on the CPU.)

Every random parameter is drawn on the CPU from the image's seed (``draw_photometric``, in the
loader workers) and travels with the batch as one row per crop; the device applies them and
draws nothing, so a batch is augmented the same whichever device, process or resumed run
applies it. The distributions are torchvision's (``ibot.data.transforms``): flip p = 0.5,
colour jitter with probability ``data.color_jitter_prob`` (brightness, contrast, saturation
and hue factors uniform in their ranges, the four in a random order), grayscale, Gaussian blur
with sigma uniform in [0.1, 2.0] and a kernel ~10 % of the crop side with reflected borders,
solarize at 128.

Any channel count C = ``data.channels``: flip, blur and brightness act on every channel alike;
contrast blends each crop with its grey mean for 3 channels (torchvision's) and each channel
with its own mean otherwise; saturation, hue and grayscale mix channels as R, G and B, so they
apply to 3 channels only: for other C they are dropped (their parameters drawn, then set
neutral, so every other draw is the one an RGB image with that seed gets; ``dropped_colour_ops``
names them for the one log line of ``ibot.data.pipeline``). uint8 crops (an 8-bit RGB decode)
are taken as value / 255 and float crops (a full-precision read) as they are; solarize inverts
values at or above the range's midpoint: 128 / 255 for uint8 crops (PIL's ``solarize(128)``),
0.5 for float crops.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ibot.config import DataConfig
from ibot.data.collate import Batch

# Columns of a crop's parameter row. ORDER..ORDER+3: the jitter op applied at each position
# (0 brightness, 1 contrast, 2 saturation, 3 hue), torchvision's random permutation.
FLIP, JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER = 0, 1, 2, 3, 4, 5, 6
GRAY, BLUR, SIGMA, SOLARIZE = 10, 11, 12, 13
NUM_PARAMS = 14
SIGMA_RANGE = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128 / 255  # uint8 crops: PIL's solarize(128) on the 8-bit values
FLOAT_SOLARIZE_THRESHOLD = 0.5  # float crops in [0, 1]: the range's midpoint
RGB_CHANNELS = 3  # the channel count that saturation, hue and grayscale apply to
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L") and torchvision


@dataclass(frozen=True)
class CropKind:
    """The per-crop probabilities that differ between global crop 1, global crop 2 and local crops."""

    blur_prob: float
    solarize_prob: float = 0.0


def crop_kinds(cfg: DataConfig) -> tuple[CropKind, CropKind, CropKind]:
    """(global crop 1, global crop 2, local crop), with the probabilities of the PIL pipeline."""
    blur_1, blur_2 = cfg.global_blur_prob
    return CropKind(blur_1), CropKind(blur_2, cfg.solarize_prob), CropKind(cfg.local_blur_prob)


def _factor(rng: random.Random, strength: float) -> float:
    """torchvision's ColorJitter range for brightness, contrast and saturation: [max(0, 1 - s), 1 + s]."""
    return rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength) if strength > 0 else 1.0


def draw_photometric(cfg: DataConfig, kind: CropKind, rng: random.Random) -> list[float]:
    """One crop's parameter row (``NUM_PARAMS`` floats); neutral values where an op is not applied."""
    row = [0.0] * NUM_PARAMS
    row[FLIP] = float(rng.random() < 0.5)
    row[BRIGHTNESS] = row[CONTRAST] = row[SATURATION] = 1.0
    row[ORDER : ORDER + 4] = [0.0, 1.0, 2.0, 3.0]
    if rng.random() < cfg.color_jitter_prob:
        brightness, contrast, saturation, hue = cfg.color_jitter
        order = [0, 1, 2, 3]
        rng.shuffle(order)
        row[JITTER] = 1.0
        row[ORDER : ORDER + 4] = [float(o) for o in order]
        row[BRIGHTNESS] = _factor(rng, brightness)
        row[CONTRAST] = _factor(rng, contrast)
        row[SATURATION] = _factor(rng, saturation)
        row[HUE] = rng.uniform(-hue, hue) if hue > 0 else 0.0
    row[GRAY] = float(rng.random() < cfg.grayscale_prob)
    if rng.random() < kind.blur_prob:
        row[BLUR] = 1.0
        row[SIGMA] = rng.uniform(*SIGMA_RANGE)
    row[SOLARIZE] = float(rng.random() < kind.solarize_prob)
    if cfg.channels != RGB_CHANNELS:  # drawn above all the same: the other draws stay those of RGB
        row[SATURATION], row[HUE], row[GRAY] = 1.0, 0.0, 0.0
    return row


def dropped_colour_ops(cfg: DataConfig) -> list[str]:
    """The configured ops that ``data.channels`` != 3 drops: saturation, hue, grayscale (those not 0)."""
    if cfg.channels == RGB_CHANNELS:
        return []
    _, _, saturation, hue = cfg.color_jitter
    strengths = {"saturation": saturation, "hue": hue, "grayscale": cfg.grayscale_prob}
    return [name for name, strength in strengths.items() if strength > 0]


def blur_kernel_size(crop_size: int) -> int:
    """Odd kernel ~10 % of the crop side, at least 3 (as ``ibot.data.transforms``)."""
    return max(3, int(0.1 * crop_size) // 2 * 2 + 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: factor * x + (1 - factor) * other, clamped to [0, 1]."""
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (n, 3, H, W) in [0, 1] by ``shift`` (n, 1, 1) turns, through HSV."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = (h + shift) % 1.0
    # HSV -> RGB: the standard sector formula, vectorised.
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    v = maxc.unsqueeze(1)
    return v - v * s.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _jitter_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """One of torchvision's four jitter ops on (n, C, H, W) with per-crop factors (n, 1, 1, 1);
    saturation and hue need C = 3."""
    if op == 0:
        return _blend(x, torch.zeros_like(x), factor)
    if op == 1:
        if x.shape[1] == RGB_CHANNELS:
            return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)
        return _blend(x, x.mean(dim=(2, 3), keepdim=True), factor)  # no luma: each channel its own mean
    if op == 2:
        return _blend(x, _gray(x), factor)
    return _adjust_hue(x, factor.view(-1, 1, 1))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of (n, C, H, W), one sigma per crop, borders reflected (torchvision's)."""
    n, c, height, width = x.shape
    half = (kernel_size - 1) * 0.5
    offsets = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    pad = kernel_size // 2
    flat = F.pad(x.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return flat.view(n, c, height, width)


def _rows(params: torch.Tensor, column: int, device: torch.device) -> torch.Tensor:
    """Indices (on ``device``) of the crops whose ``column`` is set; found on the CPU, so no device sync."""
    return params[:, column].nonzero().flatten().to(device, non_blocking=True)


def _jitter(x: torch.Tensor, params: torch.Tensor, values: torch.Tensor) -> None:
    """Colour jitter in place: at each of the 4 positions, each op on the crops that drew it there.

    Saturation and hue are applied to 3 channels only (their rows are neutral for any other C)."""
    ops = range(4) if x.shape[1] == RGB_CHANNELS else range(2)
    for position in range(4):
        for op in ops:
            # A neutral factor (the op's strength is 0 in data.color_jitter) is skipped, as torchvision does.
            active = params[:, BRIGHTNESS + op] != (0.0 if op == 3 else 1.0)
            chosen = params[:, JITTER].bool() & (params[:, ORDER + position] == op) & active
            rows = chosen.nonzero().flatten().to(x.device, non_blocking=True)
            factor = values[:, BRIGHTNESS + op].index_select(0, rows).view(-1, 1, 1, 1)
            x.index_copy_(0, rows, _jitter_op(x.index_select(0, rows), op, factor))


class Photometric:
    """Crops (N, C, S, S) on any device + their CPU parameter rows (N, ``NUM_PARAMS``) -> augmented,
    normalised float crops. uint8 crops are taken as value / 255, float crops (in [0, 1]) as they
    are. The crops of one call share one size."""

    def __init__(self, cfg: DataConfig) -> None:
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, crops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        device = crops.device
        if crops.dtype == torch.uint8:
            x, threshold = crops.float().div_(255), SOLARIZE_THRESHOLD
        else:  # a copy: the ops below work in place, and the caller's crops stay as they were
            x, threshold = crops.to(torch.float32, copy=True), FLOAT_SOLARIZE_THRESHOLD
        flip = _rows(params, FLIP, device)
        x.index_copy_(0, flip, x.index_select(0, flip).flip(-1))
        values = params.to(device, non_blocking=True)
        _jitter(x, params, values)
        if x.shape[1] == RGB_CHANNELS:  # grayscale is drawn for 3 channels only
            gray = _rows(params, GRAY, device)
            x.index_copy_(0, gray, _gray(x.index_select(0, gray)).expand(-1, RGB_CHANNELS, -1, -1))
        blur = _rows(params, BLUR, device)
        if len(blur):
            sigma = values[:, SIGMA].index_select(0, blur)
            x.index_copy_(0, blur, _gaussian_blur(x.index_select(0, blur), sigma, blur_kernel_size(x.shape[-1])))
        solarize = _rows(params, SOLARIZE, device)
        part = x.index_select(0, solarize)
        x.index_copy_(0, solarize, torch.where(part >= threshold, 1 - part, part))
        return x.sub_(self.mean.to(device)).div_(self.std.to(device))


class DeviceAugment:
    """``Batch`` of crops with parameter rows, on the training device -> the same batch with augmented,
    normalised float crops: the device step of ``data.pipeline=device`` (``ibot.data.pipeline``)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.photometric = Photometric(cfg)

    def __call__(self, batch: Batch) -> Batch:
        local = batch.local_crops
        local = self.photometric(local, batch.local_params) if len(local) else local.float()
        return replace(
            batch,
            global_crops=self.photometric(batch.global_crops, batch.global_params),
            local_crops=local,
            global_params=None,
            local_params=None,
        )
