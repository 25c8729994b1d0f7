"""The evaluation view of a decoded image: short side to size / crop_ratio, centre crop, normalise.

Two inputs, as ``ibot.data.reading`` decodes them. An 8-bit RGB PIL image takes torchvision's PIL
path (DINO's evaluation transform, unchanged). An (H, W, C) float32 array in [0, 1] (16-bit,
TIFF, ``.npy``, DICOM, any ``data.channels`` but 3) takes the same steps on a (C, H, W) tensor:
bicubic resize with antialiasing (as PIL's resize filters), centre crop, values clamped back to
[0, 1] (bicubic overshoots; PIL's 8-bit output is clamped the same way), then ``data.mean`` /
``data.std`` of C values each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

BICUBIC = T.InterpolationMode.BICUBIC


class ArrayToTensor:
    """(H, W, C) float32 array -> (C, H, W) tensor (a copy: the array may be a read-only view)."""

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:  # no address: feature-cache keys hold the transform's repr
        return "ArrayToTensor()"


class UnitClamp:
    """Values clamped to [0, 1], the range the intensity mapping gave them."""

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return "UnitClamp()"


class EvalTransform:
    """PIL image or (H, W, C) array -> the normalised (C, size, size) evaluation view."""

    def __init__(self, image_size: int, crop_ratio: float, mean: Sequence[float], std: Sequence[float]) -> None:
        resize = int(round(image_size / crop_ratio))
        self.pil = T.Compose(
            [
                T.Resize(resize, interpolation=BICUBIC),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
        self.array = T.Compose(
            [
                ArrayToTensor(),
                T.Resize(resize, interpolation=BICUBIC, antialias=True),
                T.CenterCrop(image_size),
                UnitClamp(),
                T.Normalize(mean, std),
            ]
        )

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        return self.array(image) if isinstance(image, np.ndarray) else self.pil(image)

    def __repr__(self) -> str:
        return f"EvalTransform(pil={self.pil!r}, array={self.array!r})"
