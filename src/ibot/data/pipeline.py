"""``data.pipeline``, decided once: what the loader workers apply to each image and what the training
device applies to each batch.

- ``pil``: the workers make finished crops (``ibot.data.transforms.MultiCropTransform``:
  torchvision for 8-bit RGB images, the crop plan and ``Photometric`` on the CPU for
  full-precision arrays); the device step is the identity.
- ``device``: the workers cut crops and draw their parameter rows
  (``ibot.data.crop_plan.DeviceMultiCrop``); the device step augments and normalises them
  (``ibot.data.photometric.DeviceAugment``).

The loader (``ibot.data.loaders.build_train_loader``) and the training loop take the same
``Pipeline``; nothing downstream compares the option's string or guesses from a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ibot.config import DataConfig
from ibot.data.collate import Batch
from ibot.data.crop_plan import DeviceMultiCrop
from ibot.data.photometric import DeviceAugment, dropped_colour_ops
from ibot.data.transforms import MultiCropTransform

logger = logging.getLogger(__name__)


def _identity(batch: Batch) -> Batch:
    return batch


@dataclass(frozen=True)
class Pipeline:
    """``cpu_transform``: image -> ``Crops``, applied by the dataset in the loader workers;
    ``device_step``: a collated ``Batch`` on the training device -> the batch the model trains on."""

    name: str
    cpu_transform: MultiCropTransform | DeviceMultiCrop
    device_step: Callable[[Batch], Batch]


def build_pipeline(data: DataConfig) -> Pipeline:
    """The pipeline ``data.pipeline`` names; says once what ``data.channels`` != 3 drops."""
    dropped = dropped_colour_ops(data)
    if dropped:
        # Dropped rather than refused: the recipe's defaults name them, and they have no meaning
        # without R, G and B; every other augmentation applies per channel.
        logger.info(
            "data.channels=%d: %s dropped (they need 3 channels: R, G, B); crops, flips, blur, brightness, "
            "contrast and solarize apply to every channel",
            data.channels,
            ", ".join(dropped),
        )
    if data.pipeline == "device":
        return Pipeline("device", DeviceMultiCrop(data), DeviceAugment(data))
    return Pipeline("pil", MultiCropTransform(data), _identity)
