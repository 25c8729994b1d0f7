"""Full-precision reading: 16-bit PNG, TIFF, .npy and DICOM, the axis rule, data.channels,
data.intensity, and the named skip of every kind of bad file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from ibot.data.datasets import ImageFolder
from ibot.data.pixels import read_pixels
from ibot.data.reading import RGB8, Reading, decode_image
from ibot.data.skips import (
    AMBIGUOUS_SHAPE,
    CHANNELS,
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

pydicom = pytest.importorskip("pydicom")


def _png16(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def _tiff(path: Path, values: np.ndarray, **kwargs) -> Path:
    tifffile.imwrite(path, values, **kwargs)
    return path


def _hwc_tiff(path: Path, values: np.ndarray) -> Path:
    return _tiff(path, values, photometric="minisblack", planarconfig="contig")


def _dicom(path: Path, stored: np.ndarray | None, **attrs) -> Path:
    """A minimal 2-D (or multi-frame) DICOM file of uint16 ``stored`` values, or one without pixel data."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    if stored is not None:
        frames = stored.shape[0] if stored.ndim == 3 else 1
        ds.Rows, ds.Columns = stored.shape[-2:]
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = stored.astype(np.uint16).tobytes()
    for name, value in attrs.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _read(path: Path, reading: Reading = RGB8, max_pixels: int = 0):
    return decode_image(str(path), str(path), reading, max_pixels)


# -- what each format gives ---------------------------------------------------------------------------


def test_a_12_bit_png_keeps_every_level(tmp_path: Path) -> None:
    """Today's 8-bit squeeze left 16 grey levels of a 12-bit image; the full-precision path keeps them all."""
    values = np.arange(64 * 64).reshape(64, 64) % 4096
    path = _png16(tmp_path / "a.png", values)
    unit = _read(path)  # data.channels=3, intensity=dtype: replicated, divided by 65535
    assert unit.shape == (64, 64, 3) and unit.dtype == np.float32
    np.testing.assert_allclose(unit[..., 0] * 65535, values, atol=1e-2)
    assert len(np.unique(unit)) == 4096
    assert len(np.unique(np.asarray(Image.open(path).convert("L")))) <= 256  # what Pillow alone makes of it
    stretched = _read(path, Reading(channels=1, intensity="minmax"))
    assert stretched.shape == (64, 64, 1) and stretched.min() == 0 and stretched.max() == 1


def test_8_bit_files_keep_the_8_bit_rgb_decoder(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    image = _read(tmp_path / "a.png")
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    as_array = _read(tmp_path / "a.png", Reading(intensity="minmax"))  # any other mapping: an array
    assert isinstance(as_array, np.ndarray) and as_array.shape == (8, 9, 3)


def test_a_tiff_of_five_channels_reads_the_same_channels_last_or_as_pages(tmp_path: Path) -> None:
    values = np.random.default_rng(0).integers(0, 4096, (12, 10, 5)).astype(np.uint16)
    five = Reading(channels=5)
    last = _read(_hwc_tiff(tmp_path / "last.tif", values), five)
    pages = _read(_tiff(tmp_path / "pages.tif", np.moveaxis(values, 2, 0)), five)
    assert last.shape == (12, 10, 5)
    np.testing.assert_array_equal(last, pages)
    np.testing.assert_allclose(last * 65535, values, atol=1e-2)
    assert _read(tmp_path / "last.tif") == Skip(str(tmp_path / "last.tif"), CHANNELS)  # data.channels=3


def test_npy_axis_rule(tmp_path: Path) -> None:
    hwc = np.random.default_rng(0).random((20, 24, 4)).astype(np.float32)
    four = Reading(channels=4)
    np.save(tmp_path / "hwc.npy", hwc)
    np.save(tmp_path / "chw.npy", np.moveaxis(hwc, 2, 0))
    np.testing.assert_array_equal(_read(tmp_path / "hwc.npy", four), hwc)
    np.testing.assert_array_equal(_read(tmp_path / "chw.npy", four), hwc)
    np.save(tmp_path / "hw.npy", (hwc[..., 0] * 255).astype(np.uint8))
    grey = _read(tmp_path / "hw.npy")  # one channel, repeated for data.channels=3; uint8: / 255
    assert grey.shape == (20, 24, 3)
    np.testing.assert_allclose(grey[..., 2], (hwc[..., 0] * 255).astype(np.uint8) / 255, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "reason"),
    [((5, 20, 6), AMBIGUOUS_SHAPE), ((6, 6, 6), AMBIGUOUS_SHAPE), ((40, 20, 24), VOLUME), ((2, 3, 20, 24), VOLUME)],
)
def test_npy_shapes_that_are_not_one_image(tmp_path: Path, shape: tuple[int, ...], reason: str) -> None:
    np.save(tmp_path / "x.npy", np.zeros(shape, np.float32))
    assert _read(tmp_path / "x.npy") == Skip(str(tmp_path / "x.npy"), reason)


def test_bad_arrays_are_skipped_by_name(tmp_path: Path) -> None:
    with_nan = np.zeros((8, 8), np.float32)
    with_nan[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", with_nan)
    np.save(tmp_path / "inf.npy", np.full((8, 8), np.inf))
    np.save(tmp_path / "complex.npy", np.zeros((8, 8), np.complex64))
    np.save(tmp_path / "objects.npy", np.array([[{}]], dtype=object), allow_pickle=True)
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.npy").write_text("not an array")
    expected = {
        "nan.npy": NOT_FINITE,
        "inf.npy": NOT_FINITE,
        "complex.npy": NOT_AN_IMAGE,
        "objects.npy": UNREADABLE,  # never unpickled
        "empty.npy": EMPTY,
        "text.npy": UNREADABLE,
    }
    for name, reason in expected.items():
        assert _read(tmp_path / name) == Skip(str(tmp_path / name), reason), name


def test_bad_tiffs_are_skipped_by_name(tmp_path: Path) -> None:
    nan = np.zeros((8, 8), np.float32)
    nan[0, 0] = np.inf
    _tiff(tmp_path / "inf.tif", nan)
    _tiff(tmp_path / "volume.tif", np.zeros((4, 8, 8), np.uint16), photometric="minisblack", metadata={"axes": "ZYX"})
    _tiff(tmp_path / "stack.tif", np.zeros((30, 8, 8), np.uint16))  # more pages than channels can be
    _hwc_tiff(tmp_path / "big.tif", np.zeros((64, 64, 2), np.uint16))
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\x07" * 40)
    expected = {"inf.tif": NOT_FINITE, "volume.tif": VOLUME, "stack.tif": VOLUME, "broken.tif": UNREADABLE}
    for name, reason in expected.items():
        assert _read(tmp_path / name) == Skip(str(tmp_path / name), reason), name
    assert _read(tmp_path / "big.tif", Reading(channels=2), max_pixels=64 * 64 - 1).reason == TOO_MANY_PIXELS
    assert _read(tmp_path / "big.tif", Reading(channels=2), max_pixels=64 * 64).shape == (64, 64, 2)


def test_dicom_rescale_photometric_and_bad_files(tmp_path: Path) -> None:
    stored = np.arange(16 * 16).reshape(16, 16) % 4096
    path = _dicom(tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1024)
    pixels = read_pixels(str(path), "ct.dcm", 0)
    np.testing.assert_allclose(pixels.values[..., 0], stored * 2.0 - 1024)
    assert (pixels.low, pixels.high) == (-1024, 4095 * 2 - 1024)
    window = _read(path, Reading(channels=1, intensity="window", window=(-1024.0, 0.0)))
    np.testing.assert_allclose(window[..., 0], np.clip((stored * 2.0) / 1024, 0, 1), atol=1e-6)
    inverted = read_pixels(
        str(_dicom(tmp_path / "m1.dcm", stored, PhotometricInterpretation="MONOCHROME1")), "m1.dcm", 0
    )
    np.testing.assert_allclose(inverted.values[..., 0], 4095 - stored)
    assert _read(_dicom(tmp_path / "none.dcm", None)).reason == NO_PIXEL_DATA
    assert _read(_dicom(tmp_path / "frames.dcm", np.zeros((3, 8, 8)))).reason == VOLUME


def test_dicom_without_pydicom_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    _dicom(folder / "a.dcm", np.zeros((8, 8)))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(IBOTError, match=r"pip install 'ibot\[dicom\]'"):
        ImageFolder(folder, lambda x: x, index_cache=None)


# -- data.intensity ------------------------------------------------------------------------------------


def test_intensity_mappings_per_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = np.stack([rng.integers(100, 200, (30, 30)), rng.integers(1000, 3000, (30, 30))], axis=2)
    path = _hwc_tiff(tmp_path / "two.tif", values.astype(np.uint16))
    minmax = _read(path, Reading(channels=2, intensity="minmax"))
    for c in range(2):
        lo, hi = values[..., c].min(), values[..., c].max()
        np.testing.assert_allclose(minmax[..., c], (values[..., c] - lo) / (hi - lo), atol=1e-6)
    pct = _read(path, Reading(channels=2, intensity="percentile", percentiles=(10.0, 90.0)))
    for c in range(2):
        lo, hi = np.percentile(values[..., c], [10, 90])
        np.testing.assert_allclose(pct[..., c], np.clip((values[..., c] - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert pct.min() == 0 and pct.max() == 1
    window = _read(path, Reading(channels=2, intensity="window", window=(150.0, 1150.0)))
    np.testing.assert_allclose(window, np.clip((values - 150) / 1000, 0, 1), atol=1e-6)
    flat = _hwc_tiff(tmp_path / "flat.tif", np.full((8, 8, 2), 7, np.uint16))
    assert not _read(flat, Reading(channels=2, intensity="minmax")).any()  # a constant channel -> 0, no NaN


# -- a folder of everything ----------------------------------------------------------------------------


def test_a_messy_domain_folder_names_each_skip(tmp_path: Path) -> None:
    folder = tmp_path / "domain"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    rng = np.random.default_rng(0)
    _png16(folder / "a" / "grey12.png", rng.integers(0, 4096, (16, 16)))
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "a" / "rgb.jpg")
    _hwc_tiff(folder / "b" / "five.tif", rng.integers(0, 4096, (16, 16, 5)).astype(np.uint16))
    np.save(folder / "b" / "volume.npy", np.zeros((32, 24, 24), np.float32))
    _dicom(folder / "b" / "scan.dcm", rng.integers(0, 4096, (16, 16)))
    dataset = ImageFolder(folder, lambda x: x, index_cache=None)
    views = {Path(dataset.item_path(i)).name: dataset[i] for i in range(len(dataset))}
    assert views["grey12.png"].view.shape == (16, 16, 3)
    assert isinstance(views["rgb.jpg"].view, Image.Image)
    assert views["scan.dcm"].view.shape == (16, 16, 3)
    assert dataset.skips.counts() == {CHANNELS: 1, VOLUME: 1}
    assert "1 channels differ from data.channels, 1 3-D volume" in dataset.skips.summary("pretrain")
