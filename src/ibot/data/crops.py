"""The views of one image that a multi-crop transform returns (``Crops``), in either pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Crops:
    """The views of one image: global crops (G, C, S, S) and local crops (L, C, s, s), C = ``data.channels``.

    Float, augmented and normalised (``data.pipeline=pil``), or not yet augmented with a
    parameter row per crop that the device applies (``data.pipeline=device``:
    ``ibot.data.photometric``): uint8 when cut from an 8-bit RGB decode, float32 in [0, 1]
    when cut from a full-precision array.
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    global_params: torch.Tensor | None = None
    local_params: torch.Tensor | None = None
