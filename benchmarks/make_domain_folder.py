"""Write a 'domain' copy of a labelled RGB folder: 12-bit single-channel PNGs and 5-channel TIFFs.

The data of the users who adapt iBOT (MRI, microscopy, satellite bands) is 12-16 bit and has
1 or N channels. This script makes such a folder from CIFAR-10 (or any labelled folder of RGB
images), class sub-folders kept, so a short run through a full-precision reader can be
compared with the 8-bit squeeze on the same images:

- ``png16/<class>/<name>.png``: the luminance (ITU-R 601) scaled to 0..4095 and stored in a
  16-bit greyscale PNG, as 12-bit scanners and cameras write them. Divided by 65,535 and
  rounded to 8 bits, as an 8-bit reader does, it keeps 16 grey levels.
- ``tiff5/<class>/<name>.tif``: five 12-bit channels in one uint16 TIFF (height, width, 5),
  channel last: R, G, B, the luminance and its gradient magnitude, as a stand-in for the
  extra bands of a multispectral or fluorescence image.

    python benchmarks/make_domain_folder.py runs/domain --source ../shared/data/cifar10/train --per-class 500

Image i of a class is the source's i-th file in sorted order: the same arguments give the
same bytes. The TIFFs are written with ``tifffile``, a dependency of the package.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LEVELS = 4095  # 12 bits
FORMATS = ("png16", "tiff5")


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) float64 in 0..255 (ITU-R 601 weights)."""
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def to_12bit(values: np.ndarray, top: float) -> np.ndarray:
    """``values`` in 0..``top`` as uint16 in 0..4095."""
    return np.clip(np.rint(values * (LEVELS / top)), 0, LEVELS).astype(np.uint16)


def gradient_magnitude(grey: np.ndarray) -> np.ndarray:
    """|grad| of a (H, W) image by central differences, in the image's units."""
    dy, dx = np.gradient(grey)
    return np.hypot(dx, dy)


def five_channels(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 5) uint16 12-bit: R, G, B, luminance, gradient magnitude."""
    grey = luminance(rgb)
    edges = gradient_magnitude(grey)
    top = 255.0 * np.sqrt(2)  # the largest central-difference gradient of 0..255 values
    planes = [to_12bit(rgb[..., c].astype(np.float64), 255.0) for c in range(3)]
    planes += [to_12bit(grey, 255.0), to_12bit(edges, top)]
    return np.stack(planes, axis=-1)


def write_png16(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_12bit(luminance(rgb), 255.0)).save(path)  # uint16 -> a 16-bit greyscale PNG


def write_tiff5(path: Path, rgb: np.ndarray) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, five_channels(rgb), photometric="minisblack", planarconfig="contig")


WRITERS = {"png16": (write_png16, ".png"), "tiff5": (write_tiff5, ".tif")}


def class_files(source: Path, per_class: int) -> dict[str, list[Path]]:
    """The first ``per_class`` images (sorted) of each class sub-folder of ``source``."""
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"{source}: no class sub-folders")
    return {
        c.name: sorted(p for p in c.iterdir() if p.suffix.lower() in SOURCE_EXTENSIONS)[:per_class] for c in classes
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (png16/ and tiff5/ inside)")
    parser.add_argument("--source", type=Path, required=True, help="labelled folder of RGB images")
    parser.add_argument("--per-class", type=int, default=500, help="images per class")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")
    start = time.monotonic()
    files = class_files(args.source, args.per_class)
    written = 0
    for name, paths in files.items():
        for path in paths:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
            for fmt in args.formats:
                write, suffix = WRITERS[fmt]
                write(args.out / fmt / name / f"{path.stem}{suffix}", rgb)
            written += 1
    seconds = time.monotonic() - start
    print(f"{written} images x {len(args.formats)} formats ({', '.join(args.formats)}) in {len(files)} classes")
    print(f"under {args.out} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
