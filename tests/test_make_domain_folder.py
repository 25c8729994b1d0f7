"""benchmarks/make_domain_folder.py: 12-bit greyscale PNGs and 5-channel 12-bit TIFFs of a labelled folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from conftest import load_benchmark, make_image_folder

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_domain_folder.py"


def test_png16_and_tiff5_keep_the_classes_and_twelve_bits(tmp_path: Path) -> None:
    source = make_image_folder(tmp_path / "source", classes=2, per_class=3, size=32)
    out = tmp_path / "domain"
    args = [str(out), "--source", str(source), "--per-class", "2"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("4 images x 2 formats")
    pngs, tiffs = sorted((out / "png16").rglob("*.png")), sorted((out / "tiff5").rglob("*.tif"))
    assert len(pngs) == len(tiffs) == 4 and {p.parent.name for p in pngs} == {p.parent.name for p in tiffs}
    for png, tif in zip(pngs, tiffs):
        with Image.open(png) as image:
            assert image.mode in ("I;16", "I") and image.size == (32, 32)
            grey = np.asarray(image)
        bands = tifffile.imread(tif)
        assert bands.shape == (32, 32, 5) and bands.dtype == np.uint16 and bands.max() <= 4095
        assert grey.max() <= 4095 and np.array_equal(grey, bands[..., 3])  # the same 12-bit luminance


def test_twelve_bits_keep_more_levels_than_the_8_bit_squeeze() -> None:
    script = load_benchmark("make_domain_folder")
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # every 8-bit level once
    twelve = script.to_12bit(script.luminance(ramp), 255.0)
    assert twelve.max() == 4095 and len(np.unique(twelve)) == 256
    squeezed = np.rint(twelve / 65535 * 255)  # an 8-bit reader's division by the dtype's maximum
    assert len(np.unique(squeezed)) == 17  # 0..16: 256 levels squeezed to 17 (4095 / 65535 * 255 = 15.9)


def test_five_channels_are_rgb_luminance_and_edges() -> None:
    script = load_benchmark("make_domain_folder")
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:, 4:] = 255  # a vertical edge
    bands = script.five_channels(rgb)
    assert bands.shape == (8, 8, 5) and bands[..., :4].max() == 4095 and bands[0, 0, :4].tolist() == [0, 0, 0, 0]
    assert bands[:, 3:5, 4].min() > 0 and bands[:, 0, 4].max() == 0  # gradient only at the edge
