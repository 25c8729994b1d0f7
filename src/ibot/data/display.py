"""Which channels of an image are drawn, and how: pictures and thumbnails for any ``data.channels``.

A picture has three colours. ``drawn_channels`` picks the image channels shown as red, green and
blue (``ibot visualize --channels 0,1,2``); one channel picked is drawn grey. The default is the
first three channels, or the first one in grey when there are fewer than three.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ibot.errors import IBOTError


def default_channels(channels: int) -> tuple[int, ...]:
    """The first three channels as RGB, or the first one in grey when there are fewer."""
    return (0, 1, 2) if channels >= 3 else (0,)


def drawn_channels(spec: str, channels: int, option: str = "--channels") -> tuple[int, ...]:
    """``spec`` ("0,1,2", "4"; "" = the default) as channel indices of ``channels``-channel images."""
    if not spec:
        return default_channels(channels)
    try:
        picked = tuple(int(part) for part in spec.split(","))
    except ValueError:
        raise IBOTError(f"{option} {spec}: expected channel indices such as 0,1,2 or 3") from None
    if len(picked) not in (1, 3):
        raise IBOTError(f"{option} {spec}: give 3 channels (drawn as RGB) or 1 (drawn grey), not {len(picked)}")
    wrong = [c for c in picked if not 0 <= c < channels]
    if wrong:
        raise IBOTError(f"{option} {spec}: the images have {channels} channels (0 to {channels - 1}); no {wrong[0]}")
    return picked


def to_rgb(pixels: torch.Tensor, picked: Sequence[int]) -> torch.Tensor:
    """(..., C) values in [0, 1] -> (..., 3): the ``picked`` channels, a single one repeated as grey."""
    chosen = pixels[..., list(picked)]
    return chosen.expand(*chosen.shape[:-1], 3) if len(picked) == 1 else chosen


def to_image(decoded: Image.Image | np.ndarray) -> Image.Image:
    """A decoded image (``ibot.data.reading.decode_image``) as 8-bit RGB, default channels, for a thumbnail."""
    if isinstance(decoded, Image.Image):
        return decoded
    rgb = to_rgb(torch.from_numpy(np.asarray(decoded, dtype=np.float32)), default_channels(decoded.shape[-1]))
    return Image.fromarray((rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
