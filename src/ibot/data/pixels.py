"""Bytes -> the stored pixel values of a 2-D image at full precision: (H, W, C) float32 and the
value range of the type they were stored in, or the named reason why a file cannot be used.

Formats and their axis rules:
- PNG, JPEG, BMP, ... (Pillow): 8-bit as stored (grey: 1 channel, RGB: 3; transparency
  composited on black, palettes expanded), 16-bit grey PNG as its 16-bit values. Pillow reads
  16-bit RGB PNG as 8-bit: store such data as TIFF or ``.npy``.
- TIFF (``tifffile``): the first series. ``YX`` is one channel; samples (``YXS``) or pages /
  channels (``CYX``, ``QYX``, ``IYX``: fluorescence channels, multispectral bands) become the
  channels. A depth or time axis (``Z``, ``T``) is a 3-D volume and is skipped.
- ``.npy`` (read memory-mapped): 2-D is (H, W); 3-D is channels-last (H, W, C) when the last
  axis is the only one of at most ``MAX_CHANNELS`` elements, channels-first (C, H, W) when the
  first is; any other 3-D shape is ambiguous and skipped. More axes: a volume, skipped.
- DICOM (``pydicom``, the ``dicom`` extra): one 2-D frame, rescale slope / intercept applied;
  MONOCHROME1 (bright = low values) is inverted so that bright is high, as in MONOCHROME2.

Float data must be finite (a NaN or inf would reach the loss); its range is taken as [0, 1].
Images over ``max_pixels`` pixels are skipped from the header, before their pixels are read.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ibot.data.decode import WIDE_MODES, composite_on_black, with_pillow_image
from ibot.data.skips import (
    AMBIGUOUS_SHAPE,
    EMPTY,
    NO_PIXEL_DATA,
    NOT_AN_IMAGE,
    NOT_FINITE,
    TOO_MANY_PIXELS,
    UNREADABLE,
    VOLUME,
    Skip,
)
from ibot.errors import IBOTError
from ibot.extras import require

# tifffile logs each damaged file it meets; the skip list names them once, with the reason.
logging.getLogger("tifffile").setLevel(logging.ERROR)

MAX_CHANNELS = 16  # an axis this short is channels; a longer one is a side of the image
TIFF_EXTENSIONS = (".tif", ".tiff")
NPY_EXTENSIONS = (".npy",)
DICOM_EXTENSIONS = (".dcm", ".dicom")
# Read by this module only (never by Pillow): what the 8-bit RGB fast path leaves to it.
ARRAY_EXTENSIONS = TIFF_EXTENSIONS + NPY_EXTENSIONS + DICOM_EXTENSIONS
_CHANNEL_AXES = "SCQIE"  # tifffile axis codes that are channels (samples, channels, pages, ...)


@dataclass(frozen=True)
class Pixels:
    """Stored values (H, W, C) float32 and the range [low, high] of the type they were stored in."""

    values: np.ndarray
    low: float
    high: float

    @property
    def channels(self) -> int:
        return self.values.shape[2]


def require_readers(paths: tuple[str, ...] | list[str]) -> None:
    """One line, before any worker starts, when a listed file needs an extra that is not installed."""
    if any(p.lower().endswith(DICOM_EXTENSIONS) for p in paths):
        require("pydicom", "dicom", "reading DICOM files")


def type_range(dtype: np.dtype) -> tuple[float, float]:
    """The values a stored type can hold: [0, 255] for uint8, [0, 65535] for uint16; [0, 1] for floats."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0  # bool and float data are taken to be in [0, 1]


def read_pixels(source: str | bytes, name: str, max_pixels: int) -> Pixels | Skip:
    """The pixels of the file at ``source`` (a path, or the file's bytes; ``name`` says its format)."""
    try:
        if (len(source) if isinstance(source, bytes) else os.path.getsize(source)) == 0:
            return Skip(name, EMPTY)
        ext = os.path.splitext(name)[1].lower()
        if ext in NPY_EXTENSIONS:
            return finite_or_skip(_read_npy(source, name, max_pixels), name)
        if ext in DICOM_EXTENSIONS:
            return finite_or_skip(_read_dicom(source, name, max_pixels), name)
        if ext in TIFF_EXTENSIONS:
            tiff = _read_tiff(source, name, max_pixels)
            if tiff is not None:
                return finite_or_skip(tiff, name)
        return finite_or_skip(read_pillow(source, name, max_pixels), name)
    except IBOTError:  # a missing extra: one line for the whole command, not a skip per file
        raise
    except Exception:  # noqa: BLE001 - any decoder or I/O failure means "unreadable", never a crash
        return Skip(name, UNREADABLE)


def finite_or_skip(pixels: Pixels | Skip, name: str) -> Pixels | Skip:
    """``pixels`` as float32, or a skip when float data holds a NaN or an inf."""
    if isinstance(pixels, Skip):
        return pixels
    values = np.asarray(pixels.values, dtype=np.float32)
    if not np.isfinite(values).all():
        return Skip(name, NOT_FINITE)
    return Pixels(values, pixels.low, pixels.high)


def _channels_last(array: np.ndarray, name: str, max_pixels: int) -> np.ndarray | Skip:
    """(H, W) or (H, W, C) / (C, H, W) by the module's axis rule -> (H, W, C); a skip otherwise."""
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        first, last = array.shape[0] <= MAX_CHANNELS, array.shape[2] <= MAX_CHANNELS
        if first == last:
            return Skip(name, AMBIGUOUS_SHAPE if first else VOLUME)
        if first:
            array = np.moveaxis(array, 0, 2)
    else:
        return Skip(name, VOLUME)
    if max_pixels and array.shape[0] * array.shape[1] > max_pixels:
        return Skip(name, TOO_MANY_PIXELS)
    return array


def _read_npy(source: str | bytes, name: str, max_pixels: int) -> Pixels | Skip:
    # Memory-mapped: the header's shape decides (pixel limit, axes) before any pixel is read.
    array = np.load(io.BytesIO(source) if isinstance(source, bytes) else source, mmap_mode="r", allow_pickle=False)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        return Skip(name, NOT_AN_IMAGE)
    fitted = _channels_last(array, name, max_pixels)
    if isinstance(fitted, Skip):
        return fitted
    return Pixels(np.array(fitted, dtype=np.float32), *type_range(array.dtype))


def _read_tiff(source: str | bytes, name: str, max_pixels: int) -> Pixels | Skip | None:
    """The TIFF's first series; None when ``tifffile`` cannot decode it (Pillow may: JPEG-in-TIFF)."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(source) if isinstance(source, bytes) else source) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
            extra = [a for a, n in zip(axes, shape) if a not in "YX" and n > 1]
            # A depth / time axis, or pages too many to be channels: a stack of 2-D images.
            if any(a not in _CHANNEL_AXES or n > MAX_CHANNELS for a, n in zip(axes, shape) if a in extra):
                return Skip(name, VOLUME)
            if len(extra) > 1:
                return Skip(name, AMBIGUOUS_SHAPE)
            height, width = shape[axes.index("Y")], shape[axes.index("X")]
            if max_pixels and height * width > max_pixels:
                return Skip(name, TOO_MANY_PIXELS)
            array = series.asarray()
            page = tif.pages[0]
            alpha = bool(getattr(page, "extrasamples", ())) and page.photometric == tifffile.PHOTOMETRIC.RGB
    except tifffile.TiffFileError:
        return None
    except (ValueError, NotImplementedError, KeyError):  # a compression it lacks a codec for
        return None
    keep = [i for i, (a, n) in enumerate(zip(axes, shape)) if a in "YX" or n > 1]
    array = array.reshape([shape[i] for i in keep])
    kept_axes = "".join(axes[i] for i in keep)
    array = array[:, :, None] if array.ndim == 2 else np.moveaxis(array, kept_axes.index(extra[0]), 2)
    low, high = type_range(array.dtype)
    values = array.astype(np.float32)
    if alpha and values.shape[2] == 4:  # RGBA: composited on black, as Pillow's RGB images are
        values = values[:, :, :3] * (values[:, :, 3:] - low) / (high - low)
    return Pixels(values, low, high)


def read_pillow(source: str | bytes, name: str, max_pixels: int) -> Pixels | Skip:
    """A Pillow-readable file's pixels: 8-bit as stored, 16-bit grey as its 16-bit values."""

    def pixels(img: Image.Image) -> Pixels:
        img.load()
        if img.mode in WIDE_MODES:
            return high_precision_pixels(img)
        if img.mode in ("L", "1", "LA", "La"):  # grey stays one channel
            grey = img.convert("L") if img.mode in ("L", "1") else composite_on_black(img).convert("L")
            return Pixels(np.asarray(grey)[:, :, None], 0.0, 255.0)
        return Pixels(np.asarray(composite_on_black(img)), 0.0, 255.0)

    return with_pillow_image(source, name, max_pixels, pixels)


def high_precision_pixels(img: Image.Image) -> Pixels:
    """A loaded 16-bit, 32-bit integer or float Pillow image as one channel of its own values."""
    values = np.asarray(img)
    if img.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    elif img.mode == "I":
        # 32-bit integers: Pillow's mode for 16-bit PGM / PNG in some versions; in range, 16-bit.
        low, high = (0.0, 65535.0) if values.min() >= 0 and values.max() <= 65535 else type_range(np.int32)
    else:
        low, high = 0.0, 1.0
    return Pixels(values.astype(np.float32)[:, :, None], low, high)


def _read_dicom(source: str | bytes, name: str, max_pixels: int) -> Pixels | Skip:
    pydicom = require("pydicom", "dicom", f"{name}: reading DICOM")
    ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return Skip(name, NO_PIXEL_DATA)
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        return Skip(name, VOLUME)
    rows, columns = int(ds.Rows), int(ds.Columns)
    if max_pixels and rows * columns > max_pixels:
        return Skip(name, TOO_MANY_PIXELS)
    stored = ds.pixel_array
    fitted = _channels_last(stored, name, 0)
    if isinstance(fitted, Skip):
        return fitted
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    bits = int(getattr(ds, "BitsStored", 8 * stored.dtype.itemsize))
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = fitted.astype(np.float32)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        values = (low + high) - values
    low, high = sorted((low * slope + intercept, high * slope + intercept))
    return Pixels(values * slope + intercept, float(low), float(high))
