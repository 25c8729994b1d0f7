"""Multi-crop augmentation of iBOT/DINO: 2 global crops + n local crops per image.

Global crop 1: blur p=1.0; global crop 2: blur p=0.1 and solarize p=0.2; local crops: blur
p=0.5 (the intended probabilities of the official code; DINOv2's wrapper inverts them;
each is a ``data.*_prob`` key).
All crops: random resized crop (bicubic), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with
p=0.8, grayscale p=0.2 (``data.color_jitter``, ``data.color_jitter_prob``,
``data.grayscale_prob``), then normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T

from ibot.config import DataConfig
from ibot.data.eval_transform import EvalTransform


@dataclass(frozen=True)
class Crops:
    """The views of one image: global crops (G, 3, S, S) and local crops (L, 3, s, s).

    Float and augmented (``data.pipeline=pil``), or uint8 with a parameter row per crop that
    the device applies (``data.pipeline=device``: ``ibot.data.photometric``).
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    global_params: torch.Tensor | None = None
    local_params: torch.Tensor | None = None


def _blur(p: float, size: int) -> T.RandomApply:
    # Kernel ~10% of the crop side (odd), as in SimCLR/BYOL; at 32 px this is 3 pixels.
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return T.RandomApply([T.GaussianBlur(kernel_size=kernel, sigma=(0.1, 2.0))], p=p)


class MultiCropTransform:
    """image -> ``Crops``; the official iBOT augmentation pipeline built from torchvision."""

    def __init__(self, cfg: DataConfig) -> None:
        brightness, contrast, saturation, hue = cfg.color_jitter
        jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=cfg.color_jitter_prob),
                T.RandomGrayscale(p=cfg.grayscale_prob),
            ]
        )
        normalize = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
        bicubic = T.InterpolationMode.BICUBIC
        size, local_size = cfg.global_crop_size, cfg.local_crop_size
        global_crop = T.RandomResizedCrop(size, scale=cfg.global_crop_scale, interpolation=bicubic)
        local_crop = T.RandomResizedCrop(local_size, scale=cfg.local_crop_scale, interpolation=bicubic)
        blur_1, blur_2 = cfg.global_blur_prob
        self.global_1 = T.Compose([global_crop, jitter, _blur(blur_1, size), normalize])
        solarize = T.RandomSolarize(128, p=cfg.solarize_prob)
        self.global_2 = T.Compose([global_crop, jitter, _blur(blur_2, size), solarize, normalize])
        self.local = T.Compose([local_crop, jitter, _blur(cfg.local_blur_prob, local_size), normalize])
        self.num_local_crops = cfg.num_local_crops
        self.local_crop_size = local_size

    def __call__(self, image: Image.Image) -> Crops:
        global_crops = torch.stack([self.global_1(image), self.global_2(image)])
        if self.num_local_crops:
            local_crops = torch.stack([self.local(image) for _ in range(self.num_local_crops)])
        else:
            local_crops = torch.empty(0, 3, self.local_crop_size, self.local_crop_size)
        return Crops(global_crops, local_crops)


def build_eval_transform(  # type: ignore[no-untyped-def]
    image_size: int, crop_ratio: float, mean, std
) -> EvalTransform:
    """DINO evaluation transform: resize to size/crop_ratio, centre crop, normalise; of an 8-bit RGB
    PIL image or an (H, W, C) float32 array in [0, 1] (``ibot.data.eval_transform``)."""
    return EvalTransform(image_size, crop_ratio, mean, std)
