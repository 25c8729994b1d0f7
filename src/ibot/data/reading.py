"""Which way a file is decoded, and its stored values -> (H, W, data.channels) float32 in [0, 1].

Two ways, chosen per file:
- 8-bit images (JPEG, 8-bit PNG, ...) with ``data.channels=3`` and ``data.intensity=dtype``
  are decoded to 8-bit RGB by Pillow / libjpeg-turbo, as the official code does: a PIL image
  for the torchvision pipeline, uint8 pixels for the device pipeline.
- Everything else (16-bit PNG, TIFF, ``.npy``, DICOM, any other channel count or intensity
  mapping) is read at full precision (``ibot.data.pixels``), mapped to [0, 1] here and
  returned as an (H, W, C) float32 array; its crops are cut from that array.

``data.intensity``, per image: ``dtype`` divides by the stored type's range (8-bit: / 255,
16-bit: / 65535; a 12-bit image in a 16-bit file stays dark: use ``minmax`` or
``percentile``), ``minmax`` and ``percentile`` stretch each channel between its own minimum
and maximum / its ``data.intensity_percentiles``, ``window`` maps the stored values
``data.intensity_window`` = [lo, hi] to [0, 1] (a CT window in Hounsfield units). Values
outside [0, 1] are clipped. A constant channel maps to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ibot.config import DataConfig
from ibot.data.decode import DEFAULT_MAX_PIXELS, Draft, decode_rgb
from ibot.data.pixels import ARRAY_EXTENSIONS, Pixels, finite_or_skip, high_precision_pixels, read_pixels
from ibot.data.skips import CHANNELS, Skip


@dataclass(frozen=True)
class Reading:
    """How files become pixels: the channels the model sees and the intensity mapping."""

    channels: int = 3
    intensity: str = "dtype"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] = (0.0, 1.0)

    @staticmethod
    def from_config(data: DataConfig) -> Reading:
        return Reading(data.channels, data.intensity, data.intensity_percentiles, data.intensity_window)

    @property
    def rgb8(self) -> bool:
        """Whether 8-bit files keep the 8-bit RGB decoders (and the torchvision PIL pipeline)."""
        return self.channels == 3 and self.intensity == "dtype"

    def to_unit(self, pixels: Pixels, name: str) -> np.ndarray | Skip:
        """(H, W, ``channels``) float32 in [0, 1], or a skip when the channel count differs."""
        count = pixels.channels
        if count != self.channels and not (count == 1 and self.channels == 3):
            return Skip(name, CHANNELS)
        unit = self._map(pixels)
        return np.repeat(unit, 3, axis=2) if count != self.channels else unit

    def _map(self, pixels: Pixels) -> np.ndarray:
        values = pixels.values
        if self.intensity == "dtype":
            low, high = np.float32(pixels.low), np.float32(pixels.high)
        elif self.intensity == "window":
            low, high = np.float32(self.window[0]), np.float32(self.window[1])
        elif self.intensity == "minmax":
            low, high = values.min(axis=(0, 1)), values.max(axis=(0, 1))
        else:
            flat = values.reshape(-1, values.shape[2])
            low, high = np.percentile(flat, self.percentiles, axis=0).astype(np.float32)
        span = np.asarray(high - low, dtype=np.float32)
        scale = np.divide(1.0, span, out=np.zeros_like(span), where=span > 0)  # a constant channel -> 0
        return np.clip((values - low) * scale, 0.0, 1.0, dtype=np.float32)


RGB8 = Reading()


def decode_image(
    source: str | bytes,
    name: str,
    reading: Reading = RGB8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: Draft | None = None,
) -> Image.Image | np.ndarray | Skip:
    """An 8-bit RGB PIL image, or (H, W, C) float32 in [0, 1] (see the module's rule), or a skip.

    ``draft`` reduces a JPEG on the 8-bit way (``ibot.data.decode.decode_rgb``); arrays come whole.
    """
    if reading.rgb8 and not name.lower().endswith(ARRAY_EXTENSIONS):
        image = decode_rgb(source, name, max_pixels, draft, keep_wide=True)
        if isinstance(image, Skip) or image.mode == "RGB":
            return image
        pixels: Pixels | Skip = finite_or_skip(high_precision_pixels(image), name)
    else:
        pixels = read_pixels(source, name, max_pixels)
    return pixels if isinstance(pixels, Skip) else reading.to_unit(pixels, name)
