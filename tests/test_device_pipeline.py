"""``data.pipeline=device`` draws the same augmentation distribution as ``data.pipeline=pil``.

Every test samples both pipelines on the same image and compares them with each other (and a
rate with its configured probability): crop geometry, the rate of each random op per crop kind,
measured from the pixels, the colour-jitter distributions, and the reduced-size decode.
Sample sizes and seeds are fixed: each comparison is deterministic and sits well inside its
tolerance (4.5 binomial standard errors; KS distances within their critical value at p = 1e-3,
for pixel statistics after letting values move by one uint8 step, PIL's rounding).
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms as T
from torchvision.transforms import functional as F

from ibot.config import DataConfig, MaskConfig
from ibot.data import photometric
from ibot.data.collate import MultiCropCollate
from ibot.data.crop_plan import CropPlan, DeviceMultiCrop, random_resized_box
from ibot.data.datasets import Sample, decode_view
from ibot.data.decode import DEFAULT_MAX_PIXELS, load_rgb
from ibot.data.photometric import DeviceAugment, Photometric
from ibot.data.transforms import Crops, MultiCropTransform, _blur

KINDS = ("global 1", "global 2", "local")
SIGMAS = 4.5  # binomial standard errors allowed between a rate and its expectation
MIN_P = 1e-3  # smallest KS p-value accepted: ~60 KS comparisons run, each seeded and deterministic
LEVEL = 1 / 255  # one uint8 step: PIL rounds after every op, the device works in float

# Scale (1, 1) on a square image draws exactly the full image (torchvision's 10 tries only
# accept aspect ratios that round back to the full side): the crop is the image, unresampled.
# Equal global and local sizes keep the local crops unresampled too.
PLAIN = DataConfig(
    pipeline="device",
    global_crop_size=16,
    local_crop_size=16,
    num_local_crops=1,
    global_crop_scale=(1.0, 1.0),
    local_crop_scale=(1.0, 1.0),
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    global_blur_prob=(0.0, 0.0),
    local_blur_prob=0.0,
    solarize_prob=0.0,
)
OFFICIAL = DataConfig()


# --- sampling both pipelines -------------------------------------------------------------


def _quantise(normalised: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Normalised crops -> [0, 1] on the uint8 grid, the scale both pipelines are compared on."""
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (normalised * std + mean).mul(255).round().div(255)


def _pil_views(cfg: DataConfig, image: Image.Image, n: int) -> dict[str, torch.Tensor]:
    """``n`` crops of each kind from the PIL pipeline (one local crop per call)."""
    transform = MultiCropTransform(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        crops = [transform(image) for _ in range(n)]
    views = {
        "global 1": torch.stack([c.global_crops[0] for c in crops]),
        "global 2": torch.stack([c.global_crops[1] for c in crops]),
        "local": torch.cat([c.local_crops for c in crops]),
    }
    return {kind: _quantise(v, cfg) for kind, v in views.items()}


def _device_views(cfg: DataConfig, image: Image.Image, n: int) -> dict[str, torch.Tensor]:
    """``n`` crops of each kind from the device pipeline: plan + cut per image, one batched apply."""
    multicrop, apply = DeviceMultiCrop(cfg), Photometric(cfg)
    crops = [multicrop.cut(np.asarray(image), multicrop.plan(image.size, seed)) for seed in range(n)]
    glob = apply(torch.cat([c.global_crops for c in crops]), torch.cat([c.global_params for c in crops]))
    local = apply(torch.cat([c.local_crops for c in crops]), torch.cat([c.local_params for c in crops]))
    views = {"global 1": glob[0::2], "global 2": glob[1::2], "local": local}
    return {kind: _quantise(v, cfg) for kind, v in views.items()}


def _both(cfg: DataConfig, image: Image.Image, n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return _pil_views(cfg, image, n), _device_views(cfg, image, n)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return F.pil_to_tensor(image).float().div(255)


def _assert_rates(name: str, pil: torch.Tensor, dev: torch.Tensor, expected: float | None) -> None:
    """Two boolean samples: their rates within SIGMAS binomial errors of each other and of ``expected``.

    ``expected`` None: the two compared with each other alone (their pooled rate gives the error).
    An expected 0 or 1 has no error: both samples must then be all False / all True.
    """
    rate_pil, rate_dev = pil.float().mean().item(), dev.float().mean().item()
    p = (rate_pil * len(pil) + rate_dev * len(dev)) / (len(pil) + len(dev)) if expected is None else expected
    se_pil, se_dev = math.sqrt(p * (1 - p) / len(pil)), math.sqrt(p * (1 - p) / len(dev))
    message = f"{name}: pil {rate_pil:.4f}, device {rate_dev:.4f}, configured {expected}"
    assert abs(rate_pil - rate_dev) <= SIGMAS * math.hypot(se_pil, se_dev) + 1e-12, message
    if expected is not None:
        assert abs(rate_pil - expected) <= SIGMAS * se_pil + 1e-12, message
        assert abs(rate_dev - expected) <= SIGMAS * se_dev + 1e-12, message


def _ks_within(pil: torch.Tensor, dev: torch.Tensor, tol: float) -> float:
    """The two-sample KS distance once every value may move by ``tol``: the largest gap between
    one sample's CDF at x and the other's at x + tol. ``tol`` = 0 gives the plain KS statistic;
    a uint8 step absorbs PIL's rounding (a bias of up to ~0.6 of a step in its HSV hue shift)."""
    a, b = np.sort(pil.numpy()), np.sort(dev.numpy())

    def gap(x: np.ndarray, y: np.ndarray) -> float:  # sup over x's values of F_x(v) - F_y(v + tol)
        # + 1e-6: values on the uint8 grid one step apart count as within one step.
        below = np.searchsorted(y, x + tol + 1e-6, "right")
        return float((np.arange(1, len(x) + 1) / len(x) - below / len(y)).max())

    return max(gap(a, b), gap(b, a))


def _assert_same_distribution(
    name: str, pil: torch.Tensor, dev: torch.Tensor, tol: float, range_tol: float | None
) -> None:
    """Two samples of a statistic: KS-indistinguishable at level MIN_P up to a value tolerance
    ``tol``, and (unless ``range_tol`` is None) the same min and max within ``range_tol``."""
    critical = math.sqrt(-math.log(MIN_P / 2) / 2) * math.sqrt(1 / len(pil) + 1 / len(dev))
    distance = _ks_within(pil, dev, tol)
    ranges = f"pil [{pil.min():.4f}, {pil.max():.4f}], device [{dev.min():.4f}, {dev.max():.4f}]"
    assert distance <= critical, f"{name}: KS distance {distance:.3f} > {critical:.3f}; {ranges}"
    if range_tol is not None:
        assert abs(pil.min() - dev.min()) <= range_tol + 1e-6, f"{name}: {ranges}"
        assert abs(pil.max() - dev.max()) <= range_tol + 1e-6, f"{name}: {ranges}"


# --- 1. crop geometry ----------------------------------------------------------------------


def _box_stats(boxes: list[tuple[int, ...]], width: int, height: int) -> dict[str, np.ndarray]:
    """Area fraction, log aspect ratio and the centre (as a fraction of the image) of each box."""
    top, left, h, w = (np.array(column, dtype=float) for column in zip(*boxes))
    return {
        "area": h * w / (width * height),
        "log aspect": np.log(w / h),
        "centre x": (left + w / 2) / width,
        "centre y": (top + h / 2) / height,
    }


@pytest.mark.parametrize("width, height", [(64, 64), (64, 48), (100, 20)], ids=["square", "4:3", "5:1"])
@pytest.mark.parametrize("scale", [(0.25, 1.0), (0.05, 0.25)], ids=["global", "local"])
def test_crop_geometry_matches_torchvision(width: int, height: int, scale: tuple[float, float]) -> None:
    n = 2000
    rng = random.Random(0)
    ours = [random_resized_box(width, height, scale, rng) for _ in range(n)]
    shape_only = torch.empty(1, height, width)  # get_params reads the size alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = [T.RandomResizedCrop.get_params(shape_only, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]
    if width / height > 4 / 3 and scale[0] >= 0.25:
        # The wide image mostly misses in 10 tries: the centre-crop fallback must be drawn as often.
        side = round(height * 4 / 3)
        fallback = (0, (width - side) // 2, height, side)
        hits_ours = torch.tensor([b == fallback for b in ours])
        hits_theirs = torch.tensor([b == fallback for b in theirs])
        assert hits_theirs.float().mean() > 0.5  # the case is exercised
        _assert_rates("fallback", hits_theirs, hits_ours, None)
    ours_stats, theirs_stats = _box_stats(ours, width, height), _box_stats(theirs, width, height)
    for name in ours_stats:
        pvalue = ks_2samp(ours_stats[name], theirs_stats[name], method="asymp").pvalue
        assert pvalue > MIN_P, f"{name}: KS p = {pvalue:.2e}"


def test_photometric_draws_match_torchvision() -> None:
    # What the pixels pin down poorly, checked on the draws against the PIL pipeline's own
    # ColorJitter and GaussianBlur: the jitter order (the four ops nearly commute), each factor, sigma.
    n = 2000
    cfg = replace(OFFICIAL, color_jitter_prob=1.0, global_blur_prob=(1.0, 1.0))
    rows = torch.cat([DeviceMultiCrop(cfg).plan((64, 64), seed).params[:1] for seed in range(n)])
    jitter, blur = T.ColorJitter(*cfg.color_jitter), _blur(1.0, cfg.global_crop_size).transforms[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        draws = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for _ in range(n)]
        sigmas = [T.GaussianBlur.get_params(*blur.sigma) for _ in range(n)]
    ours_order = rows[:, photometric.ORDER : photometric.ORDER + 4].long()
    theirs_order = torch.stack([d[0] for d in draws])
    for permutation in map(torch.tensor, itertools.permutations(range(4))):
        hits = [(order == permutation).all(1) for order in (theirs_order, ours_order)]
        _assert_rates(f"jitter order {permutation.tolist()}", *hits, 1 / 24)
    columns = {"brightness": photometric.BRIGHTNESS, "contrast": photometric.CONTRAST}
    columns |= {"saturation": photometric.SATURATION, "hue": photometric.HUE, "sigma": photometric.SIGMA}
    theirs = [torch.tensor(values) for values in zip(*(d[1:] for d in draws))] + [torch.tensor(sigmas)]
    for (name, column), their_values in zip(columns.items(), theirs):
        ours = rows[:, column].double()
        pvalue = ks_2samp(ours.numpy(), their_values.numpy(), method="asymp").pvalue
        assert pvalue > MIN_P, f"{name}: KS p = {pvalue:.2e}"
        # Uniform draws: 2000 of them come within ~0.1 % of the range's ends.
        torch.testing.assert_close(ours.min(), their_values.min().double(), rtol=0, atol=0.01)
        torch.testing.assert_close(ours.max(), their_values.max().double(), rtol=0, atol=0.01)


# --- 2. the rate of each random op, per crop kind, from the pixels ---------------------------


def _image(rgb: np.ndarray) -> Image.Image:
    """(S, S, 3) floats in [0, 1] -> RGB image."""
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8))


def _coloured_ramp() -> Image.Image:
    """Red dark on the left, bright on the right, over constant green and blue: a flip swaps the
    halves, and every pixel's channels differ by at least 0.3 until grayscale makes them equal."""
    side = PLAIN.global_crop_size
    ramp = np.linspace(0.1, 0.9, side)[None, :].repeat(side, 0)
    return _image(np.stack([ramp, np.full_like(ramp, 0.6), np.full_like(ramp, 0.3)], -1))


def _colourful() -> Image.Image:
    """Smooth, saturated, mirror-symmetric (a flip changes nothing), values within [0.15, 0.6]."""
    side = PLAIN.global_crop_size
    u = np.abs(np.linspace(-1, 1, side))[None, :].repeat(side, 0)
    v = np.linspace(0, 1, side)[:, None].repeat(side, 1)
    return _image(0.15 + 0.45 * np.stack([u, v, (1 - u) * (1 - v)], -1))


def _checkerboard() -> Image.Image:
    """Pixels of 140 and 240 in turn: all its contrast at the highest frequency, which blur
    removes; every value, blurred or not, at least 128, which solarize inverts."""
    side = PLAIN.global_crop_size
    board = np.add.outer(np.arange(side), np.arange(side)) % 2
    return _image(np.repeat(np.where(board, 240, 140)[:, :, None] / 255, 3, -1))


def _flipped(views: torch.Tensor) -> torch.Tensor:
    half = views.shape[-1] // 2
    return views[..., :half].mean((1, 2, 3)) > views[..., half:].mean((1, 2, 3))


def _gray(views: torch.Tensor) -> torch.Tensor:
    return (views.amax(1) - views.amin(1)).amax((1, 2)) < 0.5 * LEVEL


def _jittered(views: torch.Tensor) -> torch.Tensor:
    # More than PIL's rounding: any of the four ops at a factor other than ~1 does this.
    return (views - _to_tensor(_colourful())).abs().amax((1, 2, 3)) > 1.5 * LEVEL


def _blurred(views: torch.Tensor) -> torch.Tensor:
    # The checkerboard's std is 50/255; a blur visible at all takes well over half of it.
    return views.std((1, 2, 3)) < 25 / 255


def _inverted(views: torch.Tensor) -> torch.Tensor:
    return views.mean((1, 2, 3)) < 0.5


def _visible_blur_fraction() -> float:
    """P(``_blurred`` sees a blur) for sigma ~ U(0.1, 2.0), through the PIL pipeline's blur.

    Small sigmas change the checkerboard by less than a uint8 step (a 3-tap kernel weighs the
    neighbours exp(-0.5 / sigma^2)): the visible rate is the blur probability times this.
    """
    blur = _blur(1.0, PLAIN.global_crop_size).transforms[0]  # the PIL pipeline's kernel and range
    grid = np.linspace(*blur.sigma, 401)[1::2]  # midpoints of 200 equal steps
    image = _checkerboard()
    blurred = torch.stack([_to_tensor(F.gaussian_blur(image, blur.kernel_size, [s, s])) for s in grid])
    return _blurred(blurred).float().mean().item()


# Ops whose detectors do not disturb each other share a sample: (configuration, image).
RATE_SAMPLES = {
    "flip, grayscale": (replace(PLAIN, grayscale_prob=OFFICIAL.grayscale_prob), _coloured_ramp),
    "jitter": (
        replace(PLAIN, color_jitter=OFFICIAL.color_jitter, color_jitter_prob=OFFICIAL.color_jitter_prob),
        _colourful,
    ),
    "blur, solarize": (
        replace(
            PLAIN,
            global_blur_prob=OFFICIAL.global_blur_prob,
            local_blur_prob=OFFICIAL.local_blur_prob,
            solarize_prob=OFFICIAL.solarize_prob,
        ),
        _checkerboard,
    ),
}
RATE_CASES = {
    # op: (sample, detector, expected rate per crop kind (global 1, global 2, local))
    "flip": ("flip, grayscale", _flipped, lambda: (0.5, 0.5, 0.5)),
    "grayscale": ("flip, grayscale", _gray, lambda: (OFFICIAL.grayscale_prob,) * 3),
    "jitter": ("jitter", _jittered, lambda: (OFFICIAL.color_jitter_prob,) * 3),
    "blur": (
        "blur, solarize",
        _blurred,
        lambda: tuple(p * _visible_blur_fraction() for p in (*OFFICIAL.global_blur_prob, OFFICIAL.local_blur_prob)),
    ),
    "solarize": ("blur, solarize", _inverted, lambda: (0.0, OFFICIAL.solarize_prob, 0.0)),
}


@functools.cache
def _rate_sample(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    cfg, image = RATE_SAMPLES[name]
    return _both(cfg, image(), 1200)


@pytest.mark.parametrize("op", list(RATE_CASES))
def test_op_rates_per_crop_kind_match(op: str) -> None:
    sample, detect, expected = RATE_CASES[op]
    pil, dev = _rate_sample(sample)
    for kind, rate in zip(KINDS, expected()):
        _assert_rates(f"{op}, {kind}", detect(pil[kind]), detect(dev[kind]), rate)


def test_blur_strength_distribution_matches() -> None:
    # Global crop 1 is always blurred: the checkerboard's remaining std measures each sigma.
    pil, dev = _rate_sample("blur, solarize")
    strength_pil, strength_dev = pil["global 1"].std((1, 2, 3)), dev["global 1"].std((1, 2, 3))
    _assert_same_distribution("checkerboard std after blur", strength_pil, strength_dev, LEVEL, LEVEL)


# --- 3. colour jitter: the distribution of each op's effect ----------------------------------


def _channel_means(views: torch.Tensor) -> torch.Tensor:
    return views.mean((2, 3))


def _luma_std(views: torch.Tensor) -> torch.Tensor:
    luma = 0.299 * views[:, 0] + 0.587 * views[:, 1] + 0.114 * views[:, 2]
    return luma.std((1, 2)).unsqueeze(1)


def _saturation(views: torch.Tensor) -> torch.Tensor:
    return (views.amax(1) - views.amin(1)).mean((1, 2)).unsqueeze(1)


MEASURES = {"channel means": _channel_means, "luma std": _luma_std, "saturation": _saturation}
# Every op is checked on every measure: besides the one it moves, the others catch a wrong
# formula (e.g. contrast or saturation blending towards another gray level moves the channel means).
JITTER_STRENGTHS = {
    "brightness": (OFFICIAL.color_jitter[0], 0, 0, 0),
    "contrast": (0, OFFICIAL.color_jitter[1], 0, 0),
    "saturation": (0, 0, OFFICIAL.color_jitter[2], 0),
    "hue": (0, 0, 0, OFFICIAL.color_jitter[3]),
}


def _assert_jitter_matches(name: str, pil: torch.Tensor, dev: torch.Tensor, range_tol: float | None) -> None:
    for measure in MEASURES:
        values_pil, values_dev = MEASURES[measure](pil), MEASURES[measure](dev)
        for column in range(values_pil.shape[1]):
            label = f"{name}, {measure} [{column}]"
            _assert_same_distribution(label, values_pil[:, column], values_dev[:, column], LEVEL, range_tol)


@pytest.mark.parametrize("op", list(JITTER_STRENGTHS))
def test_single_jitter_op_distribution_matches(op: str) -> None:
    cfg = replace(PLAIN, color_jitter=JITTER_STRENGTHS[op], color_jitter_prob=1.0)
    pil, dev = _both(cfg, _colourful(), 400)
    # Flip changes nothing on this image and the op is the same for every kind: pool the kinds.
    _assert_jitter_matches(op, torch.cat(list(pil.values())), torch.cat(list(dev.values())), 2 * LEVEL)


def test_combined_jitter_distribution_matches() -> None:
    # All four ops in their random order, applied with the official probability. No range check:
    # the extremes of a product of four factors are too rarely drawn to be compared.
    pil, dev = _rate_sample("jitter")
    views_pil, views_dev = torch.cat(list(pil.values())), torch.cat(list(dev.values()))
    _assert_jitter_matches("jitter", views_pil, views_dev, None)


def test_parameter_free_ops_agree_pixelwise() -> None:
    # Grayscale (global crops 1 and 2) and solarize (global crop 2) draw nothing but whether they
    # apply: at p = 1 both pipelines give the same pixels, up to the flip (sorted values) and a
    # uint8 step of rounding. Random colours put lumas on both sides of the solarize threshold.
    cfg = replace(PLAIN, grayscale_prob=1.0, solarize_prob=1.0)
    image = _image(np.random.default_rng(0).random((PLAIN.global_crop_size,) * 2 + (3,)))
    pil, dev = _both(cfg, image, 8)
    for kind in KINDS:
        values_pil, values_dev = pil[kind].flatten(1).sort(1).values, dev[kind].flatten(1).sort(1).values
        assert (values_pil - values_dev).abs().max() <= LEVEL + 1e-6, kind


# --- 4. the device half: a pure function of each crop and its parameters -------------------


def test_device_half_is_deterministic_and_per_crop() -> None:
    # Official probabilities; equal crop sizes let global and local crops share one batch.
    cfg = DataConfig(pipeline="device", global_crop_size=16, local_crop_size=16, num_local_crops=4)
    multicrop, apply = DeviceMultiCrop(cfg), Photometric(cfg)
    image = _image(np.random.default_rng(1).random((48, 40, 3)))
    plans = [multicrop.plan(image.size, seed) for seed in range(8)]
    assert all(torch.equal(p.params, multicrop.plan(image.size, s).params) for s, p in enumerate(plans))
    views = [multicrop.cut(np.asarray(image), plan) for plan in plans]
    x = torch.cat([torch.cat([v.global_crops, v.local_crops]) for v in views])
    params = torch.cat([torch.cat([v.global_params, v.local_params]) for v in views])
    for column in (photometric.FLIP, photometric.JITTER, photometric.GRAY, photometric.BLUR, photometric.SOLARIZE):
        assert params[:, column].any() and not params[:, column].all()  # each op both applied and not
    out = apply(x, params)
    assert torch.equal(out, apply(x.clone(), params.clone()))
    torch.testing.assert_close(apply(x.flip(0), params.flip(0)), out.flip(0), rtol=0, atol=1e-6)
    for i in range(len(x)):
        torch.testing.assert_close(apply(x[i : i + 1], params[i : i + 1]), out[i : i + 1], rtol=0, atol=1e-6)
    # Through the loader's collate (crop-major rows) and DeviceAugment: each crop keeps its parameters.
    batch = MultiCropCollate(MaskConfig(), grid=4)([Sample(i, v, 0, seed=i) for i, v in enumerate(views)])
    augmented = DeviceAugment(cfg)(batch)
    per_image = out.unflatten(0, (len(views), -1))  # (images, global + local crops, ...)
    for got, expected in ((augmented.global_crops, per_image[:, :2]), (augmented.local_crops, per_image[:, 2:])):
        torch.testing.assert_close(got, expected.transpose(0, 1).flatten(0, 1), rtol=0, atol=1e-6)


# --- 5. reduced-size decode --------------------------------------------------------------------


@pytest.mark.parametrize("global_size, local_size", [(224, 96), (32, 16)])
def test_draft_size_never_makes_a_crop_smaller_than_its_output(global_size: int, local_size: int) -> None:
    cfg = DataConfig(pipeline="device", global_crop_size=global_size, local_crop_size=local_size)
    multicrop, rng, reduced = DeviceMultiCrop(cfg), random.Random(0), 0
    for seed in range(300):
        width, height = (round(math.exp(rng.uniform(math.log(8), math.log(6000)))) for _ in range(2))
        plan = multicrop.plan((width, height), seed)
        draft_width, draft_height = plan.draft_size()
        assert 1 <= draft_width <= width and 1 <= draft_height <= height
        reduced += draft_width < width
        # A JPEG draft decodes at least this size; cut() scales each box by decoded / stored size.
        for b in plan.boxes:
            assert round(b.width * draft_width / width) >= min(b.width, b.size), (width, height, b)
            assert round(b.height * draft_height / height) >= min(b.height, b.size), (width, height, b)
    assert reduced > 30  # the property is exercised where it matters


def _smooth(width: int, height: int) -> Image.Image:
    """Slow colour waves: what a reduced decode and a full one should render alike."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    waves = [np.sin(7 * x + 2), np.cos(5 * y + 3 * x), np.sin(6 * y - 1)]
    return _image(0.5 + 0.35 * np.stack(waves, -1))


class _RecordingMultiCrop(DeviceMultiCrop):
    """Records the size of every image handed to ``cut``: the decoded size."""

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.decoded_sizes: list[tuple[int, int]] = []

    def cut(self, pixels: np.ndarray, plan: CropPlan) -> Crops:
        self.decoded_sizes.append((pixels.shape[1], pixels.shape[0]))
        return super().cut(pixels, plan)


def test_large_jpeg_is_decoded_reduced_with_crops_close_to_a_full_decode(tmp_path: Path) -> None:
    # Official sizes: 224 and 96 px crops of a 2000 x 1500 photo allow a 1/2-scale decode at least.
    path = tmp_path / "large.jpg"
    _smooth(2000, 1500).save(path, quality=95)
    multicrop = _RecordingMultiCrop(DataConfig(pipeline="device"))
    full = load_rgb(path)
    for seed in range(3):
        view = decode_view(multicrop, str(path), path.name, DEFAULT_MAX_PIXELS, seed)
        decoded_width, decoded_height = multicrop.decoded_sizes[-1]
        assert decoded_width < 2000 and decoded_height < 1500
        reference = multicrop.cut(np.asarray(full), multicrop.plan(full.size, seed))
        assert torch.equal(view.global_params, reference.global_params)
        for reduced, whole in ((view.global_crops, reference.global_crops), (view.local_crops, reference.local_crops)):
            difference = (reduced.float() - whole.float()).abs().mean((1, 2, 3))
            assert difference.max() < 4, difference  # uint8 steps: < 4/255


def test_device_decoding_skips_and_converts_like_pil(tmp_path: Path) -> None:
    """libjpeg-turbo decodes what it can; everything else goes through PIL, so a file is skipped for
    the same reason, and CMYK, grayscale or misnamed images still give crops."""
    from ibot.data.skips import EMPTY, TOO_MANY_PIXELS, UNREADABLE, Skip

    good = tmp_path / "good.jpg"
    _smooth(64, 48).save(good, quality=90)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    _smooth(64, 48).convert("CMYK").save(tmp_path / "cmyk.jpg")
    _smooth(64, 48).convert("L").save(tmp_path / "gray.jpg")
    _smooth(64, 48).save(tmp_path / "png.jpg", format="PNG")
    multicrop = DeviceMultiCrop(DataConfig(pipeline="device", global_crop_size=16, local_crop_size=8))

    def view(name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> object:
        return decode_view(multicrop, str(tmp_path / name), name, max_pixels, seed=0)

    assert view("truncated.jpg") == Skip("truncated.jpg", UNREADABLE)
    assert view("empty.jpg") == Skip("empty.jpg", EMPTY)
    assert view("good.jpg", max_pixels=64 * 48 - 1) == Skip("good.jpg", TOO_MANY_PIXELS)
    for name in ("good.jpg", "cmyk.jpg", "gray.jpg", "png.jpg"):
        crops = view(name)
        assert crops.global_crops.shape == (2, 3, 16, 16) and crops.global_crops.dtype == torch.uint8, name
    gray = view("gray.jpg").global_crops
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    # libjpeg-turbo through simplejpeg decodes the same pixels as PIL
    from_bytes = decode_view(multicrop, data, "good.jpg", DEFAULT_MAX_PIXELS, seed=0).global_crops
    via_pil = multicrop.cut(np.asarray(load_rgb(good)), multicrop.plan((64, 48), 0)).global_crops
    assert torch.equal(from_bytes, via_pil)
