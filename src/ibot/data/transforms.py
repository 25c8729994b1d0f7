"""Multi-crop augmentation of iBOT/DINO: 2 global crops + n local crops per image.

Global crop 1: blur p=1.0; global crop 2: blur p=0.1 and solarize p=0.2; local crops: blur
p=0.5 (the intended probabilities of the official code; DINOv2's wrapper inverts them;
each is a ``data.*_prob`` key).
All crops: random resized crop (bicubic), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with
p=0.8, grayscale p=0.2 (``data.color_jitter``, ``data.color_jitter_prob``,
``data.grayscale_prob``), then normalisation.

An 8-bit RGB image (a PIL image) takes torchvision's PIL path, the official code's. PIL cannot
hold a 16-bit or an N-channel crop, so a full-precision array (``ibot.data.reading``) takes the
crop-plan way instead, on the CPU: the boxes and parameters of ``ibot.data.crop_plan``, drawn
from a seed taken from torch's RNG (which ``transform_seeded`` seeds from the image's seed),
float crops, then ``ibot.data.photometric.Photometric`` (the same distributions, tested).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from ibot.config import DataConfig
from ibot.data.crop_plan import DeviceMultiCrop
from ibot.data.crops import Crops
from ibot.data.eval_transform import EvalTransform
from ibot.data.photometric import Photometric

__all__ = ["Crops", "MultiCropTransform", "build_eval_transform"]


def _blur(p: float, size: int) -> T.RandomApply:
    # Kernel ~10% of the crop side (odd), as in SimCLR/BYOL; at 32 px this is 3 pixels.
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return T.RandomApply([T.GaussianBlur(kernel_size=kernel, sigma=(0.1, 2.0))], p=p)


class MultiCropTransform:
    """image -> normalised float ``Crops``: torchvision's PIL pipeline for an 8-bit RGB PIL image, the
    crop plan and ``Photometric`` on the CPU for an (H, W, C) float32 array in [0, 1]."""

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
        self.planner = DeviceMultiCrop(cfg)
        self.photometric = Photometric(cfg)

    def __call__(self, image: Image.Image | np.ndarray) -> Crops:
        if isinstance(image, np.ndarray):
            return self._from_array(image)
        global_crops = torch.stack([self.global_1(image), self.global_2(image)])
        if self.num_local_crops:
            local_crops = torch.stack([self.local(image) for _ in range(self.num_local_crops)])
        else:
            local_crops = torch.empty(0, 3, self.local_crop_size, self.local_crop_size)
        return Crops(global_crops, local_crops)

    def _from_array(self, pixels: np.ndarray) -> Crops:
        """The crop-plan way: the plan's seed comes from torch's RNG, so ``transform_seeded`` fixes it."""
        seed = int(torch.randint(0, 2**62, ()).item())
        cut = self.planner.cut(pixels, self.planner.plan((pixels.shape[1], pixels.shape[0]), seed))
        local = cut.local_crops
        local = self.photometric(local, cut.local_params) if len(local) else local
        return Crops(self.photometric(cut.global_crops, cut.global_params), local)


def build_eval_transform(  # type: ignore[no-untyped-def]
    image_size: int, crop_ratio: float, mean, std
) -> EvalTransform:
    """DINO evaluation transform: resize to size/crop_ratio, centre crop, normalise; of an 8-bit RGB
    PIL image or an (H, W, C) float32 array in [0, 1] (``ibot.data.eval_transform``)."""
    return EvalTransform(image_size, crop_ratio, mean, std)
