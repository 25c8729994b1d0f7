"""Bytes -> 8-bit RGB ``PIL.Image`` (or, for the device pipeline, RGB pixels of a JPEG decoded at
reduced scale), or the named reason why a file cannot be used.

Choices, the same as the official iBOT/DINO loaders (``Image.open(...).convert("RGB")``):
- EXIF orientation is not applied: pixels are used as stored.
- Animated GIF/WebP/APNG give their first frame.
- Truncated files are refused (PIL's ``LOAD_TRUNCATED_IMAGES`` stays False): skipped, not
  half-grey.
- Images of more than ``max_pixels`` pixels are skipped before their pixels are decoded
  (PIL's decompression-bomb limit, ``data.max_image_pixels``; 0 = no limit).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from ibot.data.skips import EMPTY, NOT_AN_IMAGE, TOO_MANY_PIXELS, UNREADABLE, UNSUPPORTED_FORMAT, Skip

T = TypeVar("T")

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS: about a 9,459 x 9,459 image


def load_rgb(path: str | Path | IO[bytes]) -> Image.Image:
    """Open any PIL-readable image as 8-bit RGB (grayscale, RGBA, CMYK, palette, 16-bit); raises if unreadable."""
    with Image.open(path) as img:
        img.load()
        return _to_rgb(img)


Draft = Callable[[tuple[int, int]], tuple[int, int] | None]


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # Pillow modes of more than 8 bits per pixel


def decode_rgb(
    source: str | bytes,
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: Draft | None = None,
    keep_wide: bool = False,
) -> Image.Image | Skip:
    """The RGB image in ``source`` (a file path or the file's bytes), or ``Skip(name, reason)``.

    With ``keep_wide`` a 16-bit, 32-bit or float image is returned as loaded, in its own mode
    (``ibot.data.reading`` keeps its precision); without, it is scaled to 8 bits.

    ``draft(stored size)`` may name the smallest size the caller needs: a JPEG is then decoded
    at 1/2, 1/4 or 1/8 scale when that still covers it (libjpeg's DCT scaling, far cheaper than
    decoding in full and resizing); other formats decode in full.
    """
    try:
        if (len(source) if isinstance(source, bytes) else os.path.getsize(source)) == 0:
            return Skip(name, EMPTY)

        def load(img: Image.Image) -> Image.Image:
            wanted = draft(img.size) if draft is not None else None
            if wanted is not None:
                img.draft(None, wanted)
            img.load()
            return img if keep_wide and img.mode in WIDE_MODES else _to_rgb(img)

        return with_pillow_image(source, name, max_pixels, load)
    except Exception:  # noqa: BLE001 - any other decoder or I/O failure means "unreadable", never a crash
        return Skip(name, UNREADABLE)


def with_pillow_image(source: str | bytes, name: str, max_pixels: int, use: Callable[[Image.Image], T]) -> T | Skip:
    """``use(img)`` of the image Pillow opens in ``source``, behind the guards every Pillow read shares:
    over ``max_pixels`` (0: no limit) is a skip known from the header, before anything is decoded,
    and so is PIL's own bomb warning; a file Pillow cannot identify is "not an image" when its
    extension is one Pillow reads, else "unsupported format"."""
    allow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            # Between PIL's limit and twice it PIL only warns; the file is skipped either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                if max_pixels and img.width * img.height > max_pixels:
                    return Skip(name, TOO_MANY_PIXELS)
                return use(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Skip(name, TOO_MANY_PIXELS)
    except UnidentifiedImageError:
        return Skip(name, NOT_AN_IMAGE if pillow_reads(name) else UNSUPPORTED_FORMAT)


def pillow_reads(name: str) -> bool:
    """Whether the installed Pillow (with its plugins) has a decoder for ``name``'s extension."""
    return os.path.splitext(name)[1].lower() in Image.registered_extensions()  # loads every plugin once


_TURBO_COLOURS = ("YCbCr", "Gray", "RGB")  # what libjpeg-turbo converts to RGB itself (not CMYK / YCCK)


def dct_scale(stored: tuple[int, int], wanted: tuple[int, int]) -> int:
    """PIL's ``draft`` rule: the largest of 8, 4, 2, 1 by which the stored size still covers ``wanted``."""
    fits = min(stored[0] // max(wanted[0], 1), stored[1] // max(wanted[1], 1))
    return next(s for s in (8, 4, 2, 1) if s <= max(fits, 1))


def decode_jpeg_scaled(data: bytes, name: str, max_pixels: int, draft: Draft) -> np.ndarray | Skip | None:
    """(H, W, 3) uint8 RGB of a JPEG through libjpeg-turbo (simplejpeg), at the DCT scale that
    ``draft(stored size)`` allows: the same pixels as PIL's decode with that ``draft``, with less
    overhead around libjpeg (~1.3x on ImageNet-sized files). ``None`` for anything it does not decode
    cleanly (not a JPEG, CMYK, truncated, damaged): ``decode_rgb`` then decides, and names the
    reason when the file is unusable.
    """
    try:
        height, width, colours, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colours not in _TURBO_COLOURS:
        return None
    if max_pixels and width * height > max_pixels:
        return Skip(name, TOO_MANY_PIXELS)
    scale = dct_scale((width, height), draft((width, height)) or (width, height))
    try:
        return simplejpeg.decode_jpeg(
            data, "RGB", min_height=-(-height // scale), min_width=-(-width // scale), strict=True
        )
    except ValueError:
        return None


def allow_pixels(max_pixels: int) -> None:
    """Raise PIL's process-wide limit to ``max_pixels`` (0: none) so our own check decides.

    Only ever raised, never lowered back: PIL's check runs inside ``Image.open``, which has no
    per-call limit, and restoring it would race with another thread decoding.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and (max_pixels == 0 or max_pixels > limit):
        Image.MAX_IMAGE_PIXELS = None if max_pixels == 0 else max_pixels


def _to_rgb(img: Image.Image) -> Image.Image:
    """The loaded frame (an animation's first) as 8-bit RGB; transparency composited on black."""
    if img.mode in WIDE_MODES:
        # PIL's own convert() clips 16-bit and float data to 0..255; rescale by the range instead.
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return composite_on_black(img)


def composite_on_black(img: Image.Image) -> Image.Image:
    """An 8-bit image as RGB; transparency composited on black (what an RGB decoder shows there)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    if img.mode == "RGB":
        # Already RGB: convert() would copy every pixel; leaving the ``with`` block only closes the file.
        return img
    return img.convert("RGB")
