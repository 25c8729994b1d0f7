"""Augmentations of 16-bit and N-channel images, in both pipelines (``data.pipeline=pil`` and ``device``).

Full-precision images (16-bit PNG, TIFF, ``.npy``) reach the transforms as (H, W, C) float32
arrays in [0, 1]; both pipelines cut their crops by the crop plan and augment them with
``ibot.data.photometric`` (the pil pipeline on the CPU, the device pipeline on the device). The
tests mirror tests/test_device_pipeline.py: shapes, determinism per seed, the draws against
RGB's, the distribution against the PIL pipeline on the same (grey) image, and the ops that
depend on the channel count; then mixed batches, precision, and training with resume.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from test_device_pipeline import LEVEL, _assert_same_distribution
from torchvision.transforms import functional as TF

from ibot.config import DataConfig, MaskConfig, load_config
from ibot.data import photometric
from ibot.data.collate import MultiCropCollate
from ibot.data.crop_plan import DeviceMultiCrop
from ibot.data.crops import Crops
from ibot.data.datasets import Sample, decode_view
from ibot.data.decode import DEFAULT_MAX_PIXELS
from ibot.data.loaders import build_train_loader
from ibot.data.photometric import Photometric
from ibot.data.pipeline import build_pipeline
from ibot.data.reading import Reading
from ibot.data.transforms import MultiCropTransform
from ibot.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from ibot.train.loop import train
from ibot.train.metrics import read_metrics

from conftest import tiny_overrides

PIPELINES = ("pil", "device")
KINDS = ("global 1", "global 2", "local")
COLOUR_COLUMNS = (photometric.SATURATION, photometric.HUE, photometric.GRAY)


def _config(channels: int, pipeline: str = "device", **kwargs: object) -> DataConfig:
    """Small crops, the official augmentation probabilities, a mean / std per channel."""
    values = {"global_crop_size": 16, "local_crop_size": 8, "num_local_crops": 2}
    values |= {"pipeline": pipeline, "channels": channels, "mean": (0.5,) * channels, "std": (0.25,) * channels}
    return DataConfig(**{**values, **kwargs})


# --- test images ---------------------------------------------------------------------------


def _png16(path: Path, values: np.ndarray) -> Path:
    """(H, W) uint16 -> a 16-bit greyscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def _write(case: str, folder: Path, seed: int = 0) -> Path:
    """One test image of 24 x 20 pixels: random values of the case's type and channels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if case == "npy 1":
        np.save(folder / "a.npy", rng.random((24, 20), dtype=np.float32))
        return folder / "a.npy"
    if case == "npy 5":
        np.save(folder / "a.npy", rng.random((24, 20, 5), dtype=np.float32))
        return folder / "a.npy"
    if case == "tiff 5":
        values = rng.integers(0, 4096, (24, 20, 5)).astype(np.uint16)  # 12-bit values
        tifffile.imwrite(folder / "a.tif", values, photometric="minisblack", planarconfig="contig")
        return folder / "a.tif"
    return _png16(folder / "a.png", rng.integers(0, 65536, (24, 20)))


# (file, data.channels): a 1-channel PNG with channels=3 is repeated into 3 channels
CASES = [("npy 1", 1), ("npy 5", 5), ("tiff 5", 5), ("png16", 1), ("png16", 3)]


def _view(pipeline_name: str, path: Path, channels: int, seed: int, **kwargs: object) -> Crops:
    pipeline = build_pipeline(_config(channels, pipeline_name, **kwargs))
    reading = Reading(channels=channels)
    view = decode_view(pipeline.cpu_transform, str(path), path.name, DEFAULT_MAX_PIXELS, seed, reading)
    assert isinstance(view, Crops), view
    return view


def _crops_equal(a: Crops, b: Crops) -> bool:
    return torch.equal(a.global_crops, b.global_crops) and torch.equal(a.local_crops, b.local_crops)


# --- shapes, dtypes, determinism -------------------------------------------------------------


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("case, channels", CASES, ids=[f"{c}-channels{n}" for c, n in CASES])
def test_crops_have_the_channels_and_depend_on_the_seed_alone(
    tmp_path: Path, case: str, channels: int, pipeline: str
) -> None:
    path = _write(case, tmp_path)
    first, again, other = (_view(pipeline, path, channels, seed) for seed in (7, 7, 8))
    assert first.global_crops.shape == (2, channels, 16, 16) and first.local_crops.shape == (2, channels, 8, 8)
    assert first.global_crops.dtype == first.local_crops.dtype == torch.float32
    assert _crops_equal(first, again) and not _crops_equal(first, other)
    if pipeline == "device":  # cut, not augmented yet: [0, 1], with a parameter row per crop
        assert first.global_params is not None and first.global_params.shape == (2, photometric.NUM_PARAMS)
        assert 0 <= first.global_crops.min() and first.global_crops.max() <= 1
    else:  # finished: normalised with the channel's mean and std (0.5, 0.25)
        assert first.global_params is None
        assert -2 - 1e-5 <= first.global_crops.min() and first.global_crops.max() <= 2 + 1e-5
    # Collated and finished by the pipeline's device step: float crops of C channels, crop-major.
    pipe = build_pipeline(_config(channels, pipeline))
    collate = MultiCropCollate(MaskConfig(), grid=4, channels=channels)
    batch = pipe.device_step(collate([Sample(0, first, 0, 7), Sample(1, other, 0, 8)]))
    assert batch.global_crops.shape == (4, channels, 16, 16) and batch.global_crops.dtype == torch.float32
    assert batch.local_crops.shape == (4, channels, 8, 8) and batch.global_params is None
    finished = build_pipeline(_config(channels, "pil"))  # the same image, the other pipeline
    assert finished.device_step(batch) is batch


def test_a_batch_of_skips_has_the_channel_count() -> None:
    from ibot.data.skips import UNREADABLE, Skip

    batch = MultiCropCollate(MaskConfig(), grid=4, channels=5)([Skip("a.tif", UNREADABLE)])
    assert batch.global_crops.shape[1] == batch.local_crops.shape[1] == 5 and batch.batch_size == 0


# --- the draws: RGB's, with the colour ops neutral -------------------------------------------


@pytest.mark.parametrize("channels", [1, 5])
def test_colour_ops_are_neutral_and_every_other_draw_is_rgbs(channels: int) -> None:
    # Saturation, hue and grayscale are drawn and then set neutral: crops, flips, jitter order,
    # brightness, contrast, blur and solarize are the draws an RGB image with the same seed gets.
    rgb, other = DeviceMultiCrop(_config(3)), DeviceMultiCrop(_config(channels))
    rows_rgb = torch.cat([rgb.plan((40, 30), seed).params for seed in range(300)])
    rows = torch.cat([other.plan((40, 30), seed).params for seed in range(300)])
    plans = [(rgb.plan((40, 30), s).boxes, other.plan((40, 30), s).boxes) for s in range(20)]
    assert all(a == b for a, b in plans)
    kept = [c for c in range(photometric.NUM_PARAMS) if c not in COLOUR_COLUMNS]
    assert torch.equal(rows[:, kept], rows_rgb[:, kept])
    assert (rows[:, photometric.SATURATION] == 1).all() and (rows[:, photometric.HUE] == 0).all()
    assert (rows[:, photometric.GRAY] == 0).all()
    # ... where RGB draws all three (the neutral values are not simply what every row has)
    assert (rows_rgb[:, photometric.SATURATION] != 1).any() and (rows_rgb[:, photometric.HUE] != 0).any()
    assert rows_rgb[:, photometric.GRAY].any()
    for column in (photometric.FLIP, photometric.JITTER, photometric.BLUR, photometric.SOLARIZE):
        assert rows[:, column].any() and not rows[:, column].all()


def test_dropped_colour_ops_are_said_once_when_the_pipeline_is_built(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ibot.data.pipeline"):
        build_pipeline(_config(5))
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and "data.channels=5: saturation, hue, grayscale dropped" in said[0]
        caplog.clear()
        build_pipeline(_config(3))  # RGB: nothing dropped
        build_pipeline(_config(1, color_jitter=(0.4, 0.4, 0.0, 0.0), grayscale_prob=0.0))  # none configured
        assert not caplog.records


# --- the ops per channel count -----------------------------------------------------------------


def _row(**values: float) -> torch.Tensor:
    """One parameter row: every op off (neutral), the named columns set."""
    row = [0.0] * photometric.NUM_PARAMS
    row[photometric.BRIGHTNESS] = row[photometric.CONTRAST] = row[photometric.SATURATION] = 1.0
    row[photometric.ORDER : photometric.ORDER + 4] = [0.0, 1.0, 2.0, 3.0]
    for name, value in values.items():
        row[getattr(photometric, name.upper())] = value
    return torch.tensor([row])


def _unnormalise(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    return x * torch.tensor(cfg.std).view(1, -1, 1, 1) + torch.tensor(cfg.mean).view(1, -1, 1, 1)


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_brightness_and_contrast_act_per_channel(channels: int) -> None:
    cfg = _config(channels)
    crop = 0.2 + 0.6 * torch.rand((1, channels, 8, 8), generator=torch.Generator().manual_seed(channels))
    crop[:, -1] *= 0.3  # channels of different means
    apply = Photometric(cfg)
    brighter = _unnormalise(apply(crop, _row(jitter=1, brightness=1.3)), cfg)
    torch.testing.assert_close(brighter, (1.3 * crop).clamp(0, 1))
    contrast = _unnormalise(apply(crop, _row(jitter=1, contrast=0.5)), cfg)
    if channels == 3:  # torchvision's: towards the mean of the luma
        expected = TF.adjust_contrast(crop, 0.5)
    else:  # each channel towards its own mean (torchvision's for 1 channel; it refuses 5)
        expected = (0.5 * crop + 0.5 * crop.mean((2, 3), keepdim=True)).clamp(0, 1)
        if channels == 1:
            torch.testing.assert_close(expected, TF.adjust_contrast(crop, 0.5))
    # 1e-4: torchvision's float luma weighs red 0.2989, PIL's (and photometric's) 0.299
    torch.testing.assert_close(contrast, expected, rtol=0, atol=1e-4)


def test_solarize_inverts_at_the_midpoint_of_the_range() -> None:
    # Float crops: 0.5. uint8 crops: 128 / 255 as before; on 8-bit values the two agree (127/255 <
    # 0.5 < 128/255), while a float between them tells the thresholds apart.
    cfg = replace(_config(1), mean=(0.0,), std=(1.0,))
    apply = Photometric(cfg)
    values = torch.tensor([0.49, 0.4999, 0.5, 0.5005, 0.51, 127 / 255, 128 / 255]).view(1, 1, 1, -1)
    expected = torch.where(values >= 0.5, 1 - values, values)
    torch.testing.assert_close(apply(values, _row(solarize=1)), expected)
    eight_bit = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).view(1, 1, 1, -1)
    solarized = apply(eight_bit, _row(solarize=1)).flatten()
    torch.testing.assert_close(solarized, torch.tensor([0, 127 / 255, 1 - 128 / 255, 0]))
    assert torch.equal(apply(values, _row()), values)  # not drawn: unchanged


def test_uint8_crops_are_the_float_crops_of_value_over_255() -> None:
    # Everything but the solarize threshold is the same computation on value / 255.
    cfg = DataConfig(pipeline="device", global_crop_size=16, local_crop_size=16, num_local_crops=0)
    multicrop = DeviceMultiCrop(cfg)
    pixels = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    views = [multicrop.cut(pixels, multicrop.plan((20, 24), seed)) for seed in range(40)]
    crops = torch.cat([v.global_crops for v in views])
    params = torch.cat([v.global_params for v in views])
    params[:, photometric.SOLARIZE] = 0
    apply = Photometric(cfg)
    as_float = crops.float() / 255
    assert torch.equal(apply(crops, params), apply(as_float, params))
    assert torch.equal(as_float, crops.float() / 255)  # the caller's float crops are left as they were


# --- the distribution against RGB's PIL pipeline ------------------------------------------------


def _grey_image(side: int) -> np.ndarray:
    """A smooth grey (side, side) image on the 8-bit grid, values in [0.15, 0.85]."""
    y, x = np.mgrid[0:side, 0:side] / side
    grey = 0.5 + 0.35 * np.sin(5 * x + 1) * np.cos(4 * y)
    return np.round(grey * 255) / 255


@pytest.mark.parametrize("channels", [1, 5])
def test_same_distribution_as_the_pil_pipeline_on_a_grey_image(channels: int) -> None:
    # On a grey image saturation, hue and grayscale change nothing, so a C-channel copy (each
    # channel the same) through the array path must look like the RGB copy through torchvision:
    # every crop's mean and spread (brightness, contrast, blur, solarize, their rates per crop kind).
    # Crops are the whole image at its size (no resampling), as in tests/test_device_pipeline.py.
    side, n = 16, 500
    plain = {"global_crop_size": side, "local_crop_size": side, "num_local_crops": 1}
    plain |= {"global_crop_scale": (1.0, 1.0), "local_crop_scale": (1.0, 1.0)}
    grey = _grey_image(side)
    rgb_cfg = DataConfig(**plain, mean=(0.0,) * 3, std=(1.0,) * 3)
    ours_cfg = DataConfig(**plain, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels)
    rgb, ours = MultiCropTransform(rgb_cfg), MultiCropTransform(ours_cfg)
    image = Image.fromarray(np.repeat(np.round(grey * 255).astype(np.uint8)[:, :, None], 3, axis=2))
    array = np.repeat(grey.astype(np.float32)[:, :, None], channels, axis=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs_crops = [rgb(image) for _ in range(n)]
        ours_crops = [ours(array) for _ in range(n)]

    def kinds(crops: list[Crops]) -> dict[str, torch.Tensor]:
        return {
            "global 1": torch.stack([c.global_crops[0] for c in crops]),
            "global 2": torch.stack([c.global_crops[1] for c in crops]),
            "local": torch.cat([c.local_crops for c in crops]),
        }

    theirs_views, ours_views = kinds(theirs_crops), kinds(ours_crops)
    for kind in KINDS:
        theirs, ours_view = theirs_views[kind], ours_views[kind]
        assert torch.equal(ours_view, ours_view[:, :1].expand_as(ours_view))  # the channels stay equal
        for name, measure in (("mean", lambda v: v.mean((1, 2, 3))), ("std", lambda v: v.std((1, 2, 3)))):
            label = f"{channels} channels, {kind}, crop {name}"
            _assert_same_distribution(label, measure(theirs), measure(ours_view[:, :1]), LEVEL, None)


# --- mixed batches, precision ------------------------------------------------------------------


def test_a_batch_of_8_bit_and_16_bit_files_is_promoted_to_float(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    rng = np.random.default_rng(0)
    for i in range(2):
        _png16(folder / f"deep{i}.png", rng.integers(0, 65536, (20, 20)))
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"rgb{i}.png")
    overrides = [f"data.path={folder}", "data.index_cache=", "data.batch_size=4", "data.num_workers=0"]
    overrides += ["data.global_crop_size=16", "data.local_crop_size=8", "data.num_local_crops=2"]
    cfg = load_config(None, overrides + ["model.patch_size=4", "data.pipeline=device"])
    batch = next(iter(build_train_loader(cfg)[0]))
    assert batch.batch_size == 4 and batch.global_crops.dtype == batch.local_crops.dtype == torch.float32
    assert 0 <= batch.global_crops.min() and batch.global_crops.max() <= 1  # uint8 ones / 255
    # Each image's rows are its own crops, uint8 ones on the [0, 1] scale.
    multicrop = DeviceMultiCrop(cfg.data)
    views = [
        decode_view(multicrop, str(folder / name), name, DEFAULT_MAX_PIXELS, seed)
        for name, seed in (("rgb0.png", 1), ("deep0.png", 2))
    ]
    assert views[0].global_crops.dtype == torch.uint8 and views[1].global_crops.dtype == torch.float32
    mixed = MultiCropCollate(MaskConfig(), grid=4)([Sample(i, v, 0, seed=i) for i, v in enumerate(views)])
    torch.testing.assert_close(mixed.global_crops[0::2], views[0].global_crops.float() / 255, rtol=0, atol=0)
    assert torch.equal(mixed.global_crops[1::2], views[1].global_crops)
    torch.testing.assert_close(mixed.local_crops[0::2], views[0].local_crops.float() / 255, rtol=0, atol=0)
    done = build_pipeline(cfg.data).device_step(mixed)
    assert done.global_crops.dtype == torch.float32 and torch.isfinite(done.global_crops).all()


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_a_12_bit_image_keeps_its_levels_in_the_crops(tmp_path: Path, pipeline: str) -> None:
    # 32 x 32 values 0, 4, ..., 4092 in a 16-bit PNG: divided by 65,535 and rounded to 8 bits (the
    # squeeze of before) they are 17 grey levels; cut from the float array, every one survives.
    values = (np.arange(1024) * 4).reshape(32, 32)
    path = _png16(tmp_path / "ramp.png", values)
    assert len(np.unique(np.round(values / 65535 * 255))) <= 17
    plain = {"global_crop_size": 32, "local_crop_size": 32, "num_local_crops": 1, "solarize_prob": 0.0}
    plain |= {"global_crop_scale": (1.0, 1.0), "local_crop_scale": (1.0, 1.0), "color_jitter_prob": 0.0}
    plain |= {"global_blur_prob": (0.0, 0.0), "local_blur_prob": 0.0, "mean": (0.0,), "std": (1.0,)}
    view = _view(pipeline, path, 1, seed=3, **plain)
    pipe = build_pipeline(_config(1, pipeline, **plain))
    finished = pipe.device_step(MultiCropCollate(MaskConfig(), grid=4, channels=1)([Sample(0, view, 0, 3)]))
    stored = torch.tensor(values / 65535, dtype=torch.float32).flatten().sort().values
    for crops in (*finished.global_crops, *finished.local_crops):
        assert len(torch.unique(crops)) == 1024
        # the image itself, flipped or not
        torch.testing.assert_close(crops.flatten().sort().values, stored, rtol=0, atol=1e-6)


# --- training through the real loader ----------------------------------------------------------


def _png16_folder(root: Path, classes: int = 2, per_class: int = 8, side: int = 16) -> Path:
    """Class sub-folders of 12-bit greyscale 16-bit PNGs around a class-specific level."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        base = rng.integers(500, 3500)
        for i in range(per_class):
            _png16(root / f"class_{c}" / f"{i:03d}.png", np.clip(base + rng.integers(-400, 400, (side, side)), 0, 4095))
    return root


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pretraining_runs_on_16_bit_pngs(tmp_path: Path, pipeline: str) -> None:
    data = _png16_folder(tmp_path / "deep")
    extra = ["train.max_steps=2", f"data.pipeline={pipeline}", "data.channels=3", "data.intensity=minmax"]
    result = train(load_config(None, tiny_overrides(data, tmp_path / "run") + extra), progress=False)
    assert result.step == 2 and np.isfinite(result.last_loss)


@pytest.mark.parametrize("workers, pipeline", [(0, "pil"), (2, "device")])
def test_resume_is_exact_on_16_bit_pngs(tmp_path: Path, workers: int, pipeline: str) -> None:
    """As tests/test_train.py's: 8 steps == 3 steps, stop, resume, 5 steps, bit for bit."""
    data = _png16_folder(tmp_path / "deep")
    extra = [f"data.num_workers={workers}", f"data.pipeline={pipeline}", "data.intensity=minmax"]
    full_cfg = load_config(None, tiny_overrides(data, tmp_path / "full") + extra)
    part_cfg = load_config(None, tiny_overrides(data, tmp_path / "part") + extra)
    train(full_cfg, progress=False)
    assert train(replace(part_cfg, train=replace(part_cfg.train, max_steps=3)), progress=False).step == 3
    assert train(part_cfg, resume=True, progress=False).step == 8
    full_rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part_rows = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in part_rows] == list(range(1, 9))
    assert [r["loss"] for r in full_rows] == [r["loss"] for r in part_rows]
    full = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)["method"]
    part = load_checkpoint(tmp_path / "part" / CHECKPOINT_NAME)["method"]
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_float_crops_stay_float32_at_full_precision() -> None:
    # A 12-bit step (1/4095) survives the cut: float16 (a step of 1/2048 near 1) would merge them.
    cfg = replace(_config(1), global_crop_scale=(1.0, 1.0), global_crop_size=8, local_crop_size=8)
    multicrop = DeviceMultiCrop(cfg)
    pixels = (4000 + np.arange(64, dtype=np.float32).reshape(8, 8)) / 4095
    crops = multicrop.cut(pixels[:, :, None], multicrop.plan((8, 8), seed=0))
    assert crops.global_crops.dtype == torch.float32
    assert len(torch.unique(crops.global_crops[0])) == 64
