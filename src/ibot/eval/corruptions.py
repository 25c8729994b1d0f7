"""The 15 common corruptions of CIFAR-10-C (Hendrycks & Dietterich, 2019), made locally.

``corrupt(image, name, severity, rng)`` takes an RGB uint8 (H, W, 3) array and returns one of
the same shape. Severities 1-5 use the strengths of the CIFAR-10-C generator (32 px images).
The maintained ``imagecorruptions`` package targets ImageNet-sized images and no longer runs
with current scikit-image, so the corruptions are written here with numpy, scipy and PIL.
Two differ by necessity: *frost* blends a procedural ice texture (the original overlays
photographs of frost, which cannot be downloaded here) and *motion blur* uses a one-sided
Gaussian line kernel in place of ImageMagick's.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

Array = np.ndarray


def _gaussian(x: Array, sigma: float) -> Array:
    """Gaussian blur over the two spatial axes of (H, W, C) or (H, W)."""
    sigmas = (sigma, sigma, 0) if x.ndim == 3 else (sigma, sigma)
    return ndimage.gaussian_filter(x, sigmas, mode="nearest")


def _convolve(x: Array, kernel: Array) -> Array:
    return np.stack([ndimage.convolve(x[..., c], kernel, mode="reflect") for c in range(x.shape[-1])], axis=-1)


def _line_kernel(radius: int, sigma: float, angle_deg: float) -> Array:
    """One-sided blur along ``angle``: Gaussian weights at distances 0..radius, splatted bilinearly."""
    size = 2 * radius + 1
    kernel = np.zeros((size, size))
    angle = np.deg2rad(angle_deg)
    for k in range(radius + 1):
        weight = np.exp(-(k**2) / (2 * sigma**2))
        y, x = radius + k * np.sin(angle), radius + k * np.cos(angle)
        y0, x0 = int(np.floor(y)), int(np.floor(x))
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                if 0 <= yy < size and 0 <= xx < size:
                    kernel[yy, xx] += weight * wy * wx
    return kernel / kernel.sum()


def _plasma(size: int, decay: float, rng: np.random.Generator) -> Array:
    """Diamond-square fractal in [0, 1], ``size`` a power of two (the fog texture)."""
    grid = np.zeros((size, size))
    step, scale = size, 100.0
    while step >= 2:
        half = step // 2
        scale /= decay
        # squares: centre = mean of 4 corners + noise
        corners = grid[0:size:step, 0:size:step]
        mean = (
            corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1) + np.roll(np.roll(corners, -1, 0), -1, 1)
        ) / 4
        grid[half:size:step, half:size:step] = mean + rng.uniform(-scale, scale, mean.shape)
        # diamonds: edge midpoints = mean of their 4 neighbours + noise
        h, w = grid.shape
        for oy, ox in ((0, half), (half, 0)):
            ys, xs = np.meshgrid(np.arange(oy, h, step), np.arange(ox, w, step), indexing="ij")
            neighbours = (
                grid[(ys - half) % h, xs]
                + grid[(ys + half) % h, xs]
                + grid[ys, (xs - half) % w]
                + grid[ys, (xs + half) % w]
            ) / 4
            grid[ys, xs] = neighbours + rng.uniform(-scale, scale, neighbours.shape)
        step = half
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def _clipped_zoom(x: Array, factor: float) -> Array:
    h, w = x.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    zoomed = ndimage.zoom(x[top : top + ch, left : left + cw], (factor, factor, 1), order=1)
    zt, zl = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[zt : zt + h, zl : zl + w]


def _pick(values: list, severity: int):  # type: ignore[no-untyped-def]
    return values[severity - 1]


# Every function: x float (H, W, 3) in [0, 1] -> float array (clipped by ``corrupt``).
def gaussian_noise(x: Array, s: int, rng: np.random.Generator) -> Array:
    return x + rng.normal(scale=_pick([0.04, 0.06, 0.08, 0.09, 0.10], s), size=x.shape)


def shot_noise(x: Array, s: int, rng: np.random.Generator) -> Array:
    c = _pick([500, 250, 100, 75, 50], s)
    return rng.poisson(x * c) / c


def impulse_noise(x: Array, s: int, rng: np.random.Generator) -> Array:
    amount = _pick([0.01, 0.02, 0.03, 0.05, 0.07], s)
    u = rng.random(x.shape)
    out = x.copy()
    out[u < amount / 2] = 0.0
    out[(u >= amount / 2) & (u < amount)] = 1.0
    return out


def defocus_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    radius, alias_sigma = _pick([(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)], s)
    span = np.arange(-8, 9)
    yy, xx = np.meshgrid(span, span, indexing="ij")
    disk = (yy**2 + xx**2 <= radius**2).astype(np.float64)
    disk = ndimage.gaussian_filter(disk / disk.sum(), alias_sigma)
    return _convolve(x, disk / disk.sum())


def glass_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    sigma, delta, iterations = _pick([(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)], s)
    x = _gaussian(x, sigma)
    h, w = x.shape[:2]
    for _ in range(iterations):
        for i in range(h - delta - 1, delta - 1, -1):
            for j in range(w - delta - 1, delta - 1, -1):
                dy, dx = rng.integers(-delta, delta, size=2)
                i2, j2 = i + dy, j + dx
                x[i, j], x[i2, j2] = x[i2, j2].copy(), x[i, j].copy()
    return _gaussian(x, sigma)


def motion_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    radius, sigma = _pick([(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)], s)
    return _convolve(x, _line_kernel(radius, sigma, rng.uniform(-45, 45)))


def zoom_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    top = _pick([1.06, 1.11, 1.16, 1.21, 1.26], s)
    factors = np.arange(1.0, top - 1e-9, 0.01)[1:]
    return (x + sum(_clipped_zoom(x, f) for f in factors)) / (len(factors) + 1)


def snow(x: Array, s: int, rng: np.random.Generator) -> Array:
    loc, scale, zoom, threshold, radius, sigma, blend = _pick(
        [
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ],
        s,
    )
    h, w = x.shape[:2]
    flakes = rng.normal(loc, scale, size=(h, w, 1))
    flakes = _clipped_zoom(flakes, zoom)
    flakes[flakes < threshold] = 0
    flakes = _convolve(np.clip(flakes, 0, 1), _line_kernel(radius, sigma, rng.uniform(-135, -45)))
    gray = x.mean(axis=2, keepdims=True)
    x = blend * x + (1 - blend) * np.maximum(x, gray * 1.5 + 0.5)
    return x + flakes + np.rot90(flakes, k=2)


def _frost_texture(h: int, w: int, rng: np.random.Generator) -> Array:
    """Procedural ice: sparse bright seeds grown into short streaks at random angles, pale blue."""
    seeds = (rng.random((h, w)) > 0.93).astype(np.float64)
    texture = sum(_convolve(seeds[..., None], _line_kernel(4, 2.0, a))[..., 0] for a in rng.uniform(0, 360, 3))
    texture = _gaussian(texture + 0.3 * rng.random((h, w)), 0.6)
    texture = texture / max(texture.max(), 1e-12)
    return texture[..., None] * np.array([0.85, 0.92, 1.0])


def frost(x: Array, s: int, rng: np.random.Generator) -> Array:
    image_weight, frost_weight = _pick([(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)], s)
    return image_weight * x + frost_weight * _frost_texture(*x.shape[:2], rng)


def fog(x: Array, s: int, rng: np.random.Generator) -> Array:
    strength, decay = _pick([(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)], s)
    h, w = x.shape[:2]
    size = 1 << int(np.ceil(np.log2(max(h, w))))
    peak = x.max()
    x = x + strength * _plasma(size, decay, rng)[:h, :w, None]
    return x * peak / (peak + strength)


def brightness(x: Array, s: int, rng: np.random.Generator) -> Array:
    """HSV value + c: scaling R, G, B together keeps hue and saturation."""
    value = x.max(axis=2, keepdims=True)
    new_value = np.clip(value + _pick([0.05, 0.1, 0.15, 0.2, 0.3], s), 0, 1)
    return np.where(value > 0, x * new_value / np.maximum(value, 1e-12), new_value)


def contrast(x: Array, s: int, rng: np.random.Generator) -> Array:
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * _pick([0.75, 0.5, 0.4, 0.3, 0.15], s) + means


def elastic_transform(x: Array, s: int, rng: np.random.Generator) -> Array:
    h, w = x.shape[:2]
    alpha, sigma, affine = (
        f * h
        for f in _pick([(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)], s)
    )
    # random affine from three jittered points (rows, cols)
    centre, third = np.array([h / 2, w / 2]), min(h, w) / 3
    src = np.array([centre + third, [centre[0] + third, centre[1] - third], centre - third])
    dst = src + rng.uniform(-affine, affine, size=src.shape)
    matrix = np.linalg.solve(np.c_[dst, np.ones(3)], np.c_[src, np.ones(3)])  # maps output -> input
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([rows, cols, np.ones_like(rows)], axis=-1).reshape(-1, 3) @ matrix
    dy = _gaussian(rng.uniform(-1, 1, size=(h, w)), sigma) * alpha if sigma > 0 else np.zeros((h, w))
    dx = _gaussian(rng.uniform(-1, 1, size=(h, w)), sigma) * alpha if sigma > 0 else np.zeros((h, w))
    ys = coords[:, 0].reshape(h, w) + dy
    xs = coords[:, 1].reshape(h, w) + dx
    return np.stack([ndimage.map_coordinates(x[..., c], [ys, xs], order=1, mode="reflect") for c in range(3)], axis=-1)


def _through_pil(x: Array, fn: Callable[[Image.Image], Image.Image]) -> Array:
    out = fn(Image.fromarray(np.uint8(np.clip(x, 0, 1) * 255 + 0.5)))
    return np.asarray(out.convert("RGB"), dtype=np.float64) / 255


def pixelate(x: Array, s: int, rng: np.random.Generator) -> Array:
    c = _pick([0.95, 0.9, 0.85, 0.75, 0.65], s)
    h, w = x.shape[:2]
    return _through_pil(x, lambda im: im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX))


def jpeg_compression(x: Array, s: int, rng: np.random.Generator) -> Array:
    quality = _pick([80, 65, 58, 50, 40], s)

    def roundtrip(im: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue()))

    return _through_pil(x, roundtrip)


CORRUPTIONS: dict[str, Callable[[Array, int, np.random.Generator], Array]] = {
    f.__name__: f
    for f in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        defocus_blur,
        glass_blur,
        motion_blur,
        zoom_blur,
        snow,
        frost,
        fog,
        brightness,
        contrast,
        elastic_transform,
        pixelate,
        jpeg_compression,
    )
}


def corrupt(image: Array, name: str, severity: int, rng: np.random.Generator) -> Array:
    """RGB uint8 (H, W, 3) -> the same image under corruption ``name`` at ``severity`` (1-5)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1-5, got {severity}")
    out = CORRUPTIONS[name](image.astype(np.float64) / 255, severity, rng)
    return np.uint8(np.clip(out, 0, 1) * 255 + 0.5)
