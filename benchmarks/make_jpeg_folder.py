"""Write an ImageNet-like folder of JPEGs: the sizes, qualities and file sizes of ImageNet's train set.

Input benchmarks (benchmarks/input.py) need a folder whose decode and crop cost is that of
ImageNet, which is not on every machine. Each image here draws ImageNet's shapes (most
500 x 375, 500 x 333 or 375 x 500, a spread of smaller ones, a few up to 1000 px), a JPEG
quality around ImageNet's (75-96, 4:2:0 chroma) and carries enough texture that its file
size, hence its entropy decoding, is a photograph's. 2,000 images from CIFAR-10: mean
417 x 353 px and 105 KB (ImageNet's train set: about 400 x 350 and 110 KB), 33 s on 2 cores.

    python benchmarks/make_jpeg_folder.py runs/jpegs --images 2000 --source ../shared/data/cifar10/train
    python benchmarks/make_jpeg_folder.py runs/jpegs --images 200          # synthetic pixels

Pixels: a source image (e.g. CIFAR-10) upscaled to the drawn size, or smooth random colour
fields without ``--source``, plus multi-octave noise (coarse to pixel-fine, as photographs'
detail) whose strength is drawn per image. Image i depends on (seed, i) alone: the same
seed gives the same bytes whatever ``--jobs``.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Shares of ImageNet's train shapes, approximately: longer side exactly 500 px (the Flickr
# downloads), shorter than 500, or larger; landscape four times in five.
LONG_500, SMALLER = 0.45, 0.47  # the rest (0.08) is larger, up to 1000 px
ASPECTS = ((0.75, 0.6), (2 / 3, 0.25), (1.0, 0.05), (0.8, 0.1))  # (short / long, share): 375, 333, 500, 400
NOISE_OCTAVES = 5  # pixel-fine up to 16-pixel blobs


@dataclass(frozen=True)
class Options:
    out: Path
    images: int
    classes: int
    source: Path | None
    seed: int
    jobs: int


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) as ImageNet's train images are distributed."""
    kind = rng.random()
    if kind < LONG_500:
        ratios, shares = zip(*ASPECTS)
        long_side, ratio = 500, ratios[rng.choice(len(ratios), p=shares)]
    elif kind < LONG_500 + SMALLER:
        long_side, ratio = int(rng.integers(150, 500)), rng.uniform(0.6, 0.9)
    else:
        long_side, ratio = int(rng.integers(501, 1001)), rng.uniform(0.6, 0.85)
    short_side = max(int(round(long_side * ratio)), 1)
    return (long_side, short_side) if rng.random() < 0.8 else (short_side, long_side)


def draw_quality(rng: np.random.Generator) -> int:
    """A quarter at libjpeg's default 75, the rest around 91 (the cameras' and editors' settings)."""
    if rng.random() < 1 / 4:
        return 75
    return int(np.clip(round(rng.normal(91, 3)), 75, 96))


def texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width) luminance detail: one noise field per octave, upscaled, strongest at the finest."""
    strength = rng.uniform(25.0, 60.0)  # grey levels at the pixel scale: smooth skies to foliage
    total = np.zeros((height, width), np.float32)
    for octave in range(NOISE_OCTAVES):
        scale = 2**octave
        small = rng.standard_normal((max(height // scale, 1), max(width // scale, 1)), np.float32) * strength
        field = Image.fromarray(small, mode="F").resize((width, height), Image.BILINEAR) if scale > 1 else small
        total += np.asarray(field, np.float32) * 0.8**octave
    return total


def base_pixels(rng: np.random.Generator, sources: list[Path], width: int, height: int) -> np.ndarray:
    """(height, width, 3) float: a source image stretched to the size, or a smooth random colour field."""
    if sources:
        with Image.open(sources[int(rng.integers(len(sources)))]) as image:
            small = image.convert("RGB")
    else:
        cells = rng.integers(0, 256, (int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3), dtype=np.uint8)
        small = Image.fromarray(cells)
    return np.asarray(small.resize((width, height), Image.BICUBIC), np.float32)


def make_image(seed: int, index: int, sources: list[Path]) -> tuple[int, int, bytes]:
    """Image ``index`` of the folder: (width, height, JPEG bytes)."""
    rng = np.random.default_rng([seed, index])
    width, height = draw_size(rng)
    quality = draw_quality(rng)
    pixels = base_pixels(rng, sources, width, height)
    pixels += texture(rng, width, height)[..., None]
    pixels += rng.standard_normal(pixels.shape, np.float32) * 3.0  # a little chroma noise, as sensors add
    image = Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, subsampling=2)  # 2: 4:2:0, as ImageNet's JPEGs
    return width, height, buffer.getvalue()


def list_sources(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SOURCE_EXTENSIONS)
    if not found:
        raise SystemExit(f"--source {folder}: no images found")
    return found


_JOB: tuple[Options, list[Path]] | None = None  # each worker's (options, sources), set once, not per image


def _set_job(options: Options, sources: list[Path]) -> None:
    global _JOB
    _JOB = (options, sources)


def _write(index: int) -> tuple[int, int, int]:
    assert _JOB is not None
    options, sources = _JOB
    width, height, data = make_image(options.seed, index, sources)
    name = f"n{index % options.classes:08d}"
    (options.out / name / f"{name}_{index}.JPEG").write_bytes(data)
    return width, height, len(data)


def make_folder(options: Options) -> list[tuple[int, int, int]]:
    """Write the folder; returns (width, height, bytes) per image."""
    sources = list_sources(options.source)
    for c in range(options.classes):
        (options.out / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    if options.jobs <= 1:
        _set_job(options, sources)
        return [_write(i) for i in range(options.images)]
    with Pool(options.jobs, initializer=_set_job, initargs=(options, sources)) as pool:
        return pool.map(_write, range(options.images), chunksize=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--source", type=Path, default=None, help="a folder of images to upscale (e.g. CIFAR-10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="processes")
    args = parser.parse_args()
    if args.images < 1 or args.classes < 1:
        parser.error("--images and --classes must be >= 1")
    start = time.perf_counter()
    made = make_folder(Options(args.out, args.images, args.classes, args.source, args.seed, args.jobs))
    widths, heights, sizes = (np.array(column) for column in zip(*made))
    print(
        f"{len(made)} JPEGs in {args.classes} classes under {args.out}: mean {widths.mean():.0f} x "
        f"{heights.mean():.0f} px, mean {sizes.mean() / 1024:.0f} KB, total {sizes.sum() / 2**20:.1f} MB, "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
