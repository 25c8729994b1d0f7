"""benchmarks/make_jpeg_folder.py: an ImageNet-like JPEG folder, deterministic for a seed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image, JpegImagePlugin

from conftest import load_benchmark, make_image_folder

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_jpeg_folder.py"


def _load_script():  # type: ignore[no-untyped-def]
    return load_benchmark("make_jpeg_folder")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def test_folder_of_imagenet_like_jpegs(tmp_path: Path) -> None:
    source = make_image_folder(tmp_path / "source", classes=2, per_class=3, size=32)
    out = tmp_path / "jpegs"
    args = [str(out), "--images", "20", "--classes", "4", "--source", str(source), "--jobs", "2"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("20 JPEGs in 4 classes")
    files = sorted(out.rglob("*.JPEG"))
    assert len(files) == 20 and len({f.parent for f in files}) == 4
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert JpegImagePlugin.get_sampling(image) == 2  # 4:2:0 chroma
            width, height = image.size
            image.load()  # decodes whole
        assert 150 <= max(width, height) <= 1000 and min(width, height) >= 0.6 * 150
    sizes = [f.stat().st_size for f in files]
    # Photograph-like entropy: a bare upscaled 32-px image compresses to a few KB.
    assert 40_000 < sum(sizes) / len(sizes) < 250_000


def test_same_seed_same_bytes_whatever_the_jobs(tmp_path: Path) -> None:
    source = make_image_folder(tmp_path / "source", classes=2, per_class=3, size=32)
    cli = tmp_path / "cli"
    args = [str(cli), "--images", "6", "--classes", "2", "--source", str(source), "--jobs", "2", "--seed", "3"]
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True, capture_output=True, timeout=120)
    script = _load_script()
    script.make_folder(script.Options(tmp_path / "same", 6, 2, source, 3, 1))
    script.make_folder(script.Options(tmp_path / "other", 6, 2, source, 4, 1))
    made, other = _files(cli), _files(tmp_path / "other")
    assert len(made) == 6
    assert _files(tmp_path / "same") == made
    assert other.keys() == made.keys() and all(other[name] != made[name] for name in made)
