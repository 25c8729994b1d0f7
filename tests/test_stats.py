"""``ibot stats``: per-channel mean / std of a folder's pixels, a seeded sample, unreadable files replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ibot.cli import main
from ibot.config import DataConfig, load_config
from ibot.data.stats import channel_stats
from ibot.errors import DataError

from conftest import make_image_folder


def _pixels(folder: Path) -> np.ndarray:
    """Every pixel of the folder's generated PNGs (``000.png``...), (N, 3) in [0, 1]: the reference."""
    paths = sorted(p for p in folder.rglob("*.png") if p.stem.isdigit())
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p in paths]
    return np.concatenate([a.reshape(-1, 3) for a in arrays])


def test_the_whole_folder_gives_the_pixels_mean_and_std(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", classes=3, per_class=4)
    stats = channel_stats(str(folder), DataConfig(), images=100, seed=0)
    pixels = _pixels(folder)
    assert stats.images == 12 and stats.pixels == 12 * 16 * 16 and not stats.skips
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.std, pixels.std(axis=0), rtol=1e-5)


def test_a_sample_is_seeded(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", classes=4, per_class=4)  # four class colours
    first, again = (channel_stats(str(folder), DataConfig(), images=3, seed=1) for _ in range(2))
    other = channel_stats(str(folder), DataConfig(), images=3, seed=2)
    assert first == again and first.images == 3
    assert first.mean != other.mean  # another draw of 3 of the 16 images


def test_unreadable_files_are_replaced_and_listed(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", classes=1, per_class=3)
    for name in ("bad1.png", "bad2.png"):
        (folder / "class_0" / name).write_bytes(b"not a png")
    stats = channel_stats(str(folder), DataConfig(), images=3, seed=0)
    assert stats.images == 3  # the broken draws were replaced by readable ones
    everything = channel_stats(str(folder), DataConfig(), images=10, seed=0)
    assert everything.images == 3 and sorted(Path(s.path).name for s in everything.skips) == ["bad1.png", "bad2.png"]
    np.testing.assert_allclose(everything.mean, _pixels(folder).mean(axis=0), rtol=1e-6)
    (folder / "class_0" / "000.png").write_bytes(b"")
    for name in ("001.png", "002.png"):
        (folder / "class_0" / name).write_bytes(b"junk")
    with pytest.raises(DataError, match="no image decoded"):
        channel_stats(str(folder), DataConfig(), images=3, seed=0)


def test_cli_prints_and_writes_a_snippet_the_config_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=3)
    out = tmp_path / "stats.yaml"
    assert main(["stats", str(folder), "--images", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| channel (6 images, seed 0) | mean | std |" in printed and "data:\n  mean: [" in printed
    cfg = load_config(out)
    expected = _pixels(folder)
    np.testing.assert_allclose(cfg.data.mean, expected.mean(axis=0), atol=1e-4)  # written to 4 decimals
    np.testing.assert_allclose(cfg.data.std, expected.std(axis=0), atol=1e-4)
    before = out.read_bytes()
    assert main(["stats", str(folder), "--out", str(out)]) == 2  # not replaced without --force
    assert "--out" in capsys.readouterr().err and out.read_bytes() == before
    with pytest.raises(SystemExit):  # argparse: one line naming --images
        main(["stats", str(folder), "--images", "0"])
    assert "--images" in capsys.readouterr().err
