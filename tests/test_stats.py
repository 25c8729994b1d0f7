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
    assert (
        "| channel (6 images, seed 0, data.intensity=dtype) | mean | std |" in printed and "data:\n  mean: [" in printed
    )
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


def _five_channel_folder(root: Path, count: int = 6) -> np.ndarray:
    """12-bit 5-channel TIFFs in two classes; returns every pixel as (N, 5) values in [0, 1] (/ 65535)."""
    import tifffile

    rng = np.random.default_rng(0)
    pixels = []
    for i in range(count):
        values = rng.integers(0, 4096, (8, 8, 5)).astype(np.uint16)
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / f"{i}.tif", values, photometric="minisblack", planarconfig="contig")
        pixels.append(values.reshape(-1, 5) / 65535)
    return np.concatenate(pixels)


def test_stats_are_taken_after_the_intensity_mapping_and_per_channel(tmp_path: Path) -> None:
    pixels = _five_channel_folder(tmp_path / "tiffs")
    five = DataConfig(channels=5, mean=(), std=())
    stats = channel_stats(str(tmp_path / "tiffs"), five, images=100, seed=0)
    assert len(stats.mean) == 5 and stats.images == 6
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats.std, pixels.std(axis=0), rtol=1e-4)
    window = channel_stats(
        str(tmp_path / "tiffs"),
        DataConfig(channels=5, mean=(), std=(), intensity="window", intensity_window=(0.0, 4095.0)),
        100,
        0,
    )
    np.testing.assert_allclose(window.mean, (pixels * 65535 / 4095).mean(axis=0), rtol=1e-5)


def test_auto_stats_are_measured_once_cached_and_measured_again_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ibot.data.stats as stats_module

    pixels = _five_channel_folder(tmp_path / "tiffs")
    data = DataConfig(path=str(tmp_path / "tiffs"), channels=5, mean=(), std=(), index_cache=str(tmp_path / "cache"))
    resolved = stats_module.resolve_auto_stats(data, seed=0)
    np.testing.assert_allclose(resolved.mean, pixels.mean(axis=0), rtol=1e-5)
    assert not resolved.auto_stats
    measured = []
    real = stats_module._measure  # what reads the sample's pixels
    monkeypatch.setattr(stats_module, "_measure", lambda *a, **k: measured.append(1) or real(*a, **k))
    assert stats_module.resolve_auto_stats(data, seed=0) == resolved and not measured  # from the cache
    import tifffile

    tifffile.imwrite(
        tmp_path / "tiffs" / "c0" / "0.tif",
        np.zeros((8, 8, 5), np.uint16),
        photometric="minisblack",
        planarconfig="contig",
    )
    changed = stats_module.resolve_auto_stats(data, seed=0)
    assert measured and changed.mean != resolved.mean
    assert stats_module.resolve_auto_stats(replace_mean(data), seed=0).mean == (0.5,) * 5  # only what is auto


def replace_mean(data: DataConfig) -> DataConfig:
    from dataclasses import replace

    return replace(data, mean=(0.5,) * 5)


def test_auto_stats_on_a_folder_with_nothing_readable_is_one_line(tmp_path: Path) -> None:
    from ibot.data.stats import resolve_auto_stats

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.tif").write_bytes(b"II*\x00junk")
    with pytest.raises(DataError, match="no image decoded"):
        resolve_auto_stats(DataConfig(path=str(tmp_path / "bad"), mean=(), std=(), index_cache=""))


def test_pretrain_with_auto_stats_writes_the_numbers_and_a_resume_keeps_them(tmp_path: Path) -> None:
    import yaml

    from ibot.train.loop import train

    from conftest import tiny_overrides

    folder = make_image_folder(tmp_path / "images", classes=2, per_class=4)
    overrides = [*tiny_overrides(folder, tmp_path / "run"), "data.mean=auto", "data.std=auto", "optim.epochs=1"]
    train(load_config(None, overrides), progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    np.testing.assert_allclose(saved["mean"], _pixels(folder).mean(axis=0), rtol=1e-5)
    # A file changed before the resume: the resumed run keeps the numbers it started with.
    Image.new("RGB", (16, 16), (255, 255, 255)).save(folder / "class_0" / "000.png")
    again = train(load_config(None, [*overrides, "optim.epochs=2"]), resume=True, progress=False)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["mean"] == saved["mean"]
    assert again.step > 1
