from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibot.config import DataConfig, MaskConfig
from ibot.data.collate import MultiCropCollate
from ibot.data.datasets import ImageFolder, ImageFolderIndex, load_rgb, transform_seeded
from ibot.data.loaders import InfiniteSampler
from ibot.data.transforms import MultiCropTransform
from ibot.errors import ConfigError, DataError


class TestLoadRGB:
    @pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA"])
    def test_modes_become_rgb(self, tmp_path: Path, mode: str) -> None:
        path = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (5, 4)).save(path)
        img = load_rgb(path)
        assert img.mode == "RGB" and img.size == (5, 4)

    def test_16_bit_is_rescaled_not_clipped(self, tmp_path: Path) -> None:
        arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
        path = tmp_path / "deep.png"
        Image.fromarray(arr).save(path)
        assert Image.open(path).mode.startswith("I")
        out = np.asarray(load_rgb(path))
        assert out.shape == (1, 3, 3)
        assert out[0, :, 0].tolist() == [0, 127, 255]  # PIL's convert would give [0, 255, 255]

    def test_rgba_transparent_pixels_are_black(self, tmp_path: Path) -> None:
        path = tmp_path / "alpha.png"
        Image.new("RGBA", (2, 2), (200, 100, 50, 0)).save(path)
        assert np.asarray(load_rgb(path)).max() == 0


class TestImageFolder:
    def test_labels_from_class_folders(self, image_folder: Path) -> None:
        index = ImageFolderIndex.scan(image_folder)
        assert index.classes == ("class_0", "class_1")
        assert len(index.paths) == 16 and sorted(set(index.labels)) == [0, 1]

    def test_flat_folder_has_no_labels(self, tmp_path: Path) -> None:
        Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
        assert ImageFolderIndex.scan(tmp_path).labels == (-1,)

    def test_missing_and_empty_paths_fail_with_one_line(self, tmp_path: Path) -> None:
        with pytest.raises(DataError, match="does not exist"):
            ImageFolderIndex.scan(tmp_path / "nope")
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("x")
        with pytest.raises(DataError, match="no images found"):
            ImageFolderIndex.scan(tmp_path / "empty")

    def test_index_cache_is_reused_until_the_folder_changes(
        self, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import ibot.data.datasets as datasets

        cache = tmp_path / "cache"
        first = ImageFolderIndex.scan(image_folder, cache)
        assert len(list(cache.glob("index-*.json"))) == 1

        def no_walk(root: Path) -> None:
            raise AssertionError("re-scanned an unchanged folder")

        with monkeypatch.context() as m:
            m.setattr(datasets, "scan_folder", no_walk)
            assert ImageFolderIndex.scan(image_folder, cache) == first
        Image.new("RGB", (4, 4)).save(image_folder / "class_1" / "new.png")
        second = ImageFolderIndex.scan(image_folder, cache)
        assert len(second.paths) == len(first.paths) + 1

    def test_corrupt_image_is_skipped_and_counted(self, image_folder: Path) -> None:
        bad = image_folder / "class_0" / "zz_corrupt.jpg"
        bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
        (image_folder / "class_1" / "zz_empty.png").write_bytes(b"")
        cfg = DataConfig(global_crop_size=16, local_crop_size=8, num_local_crops=2)
        dataset = ImageFolder(image_folder, MultiCropTransform(cfg))
        collate = MultiCropCollate(MaskConfig(), grid=4)
        batch = collate([dataset[i] for i in range(len(dataset))])
        assert batch.batch_size == 16 and len(batch.skipped) == 2
        assert str(bad) in [s.path for s in batch.skipped]


def test_multicrop_shapes_and_normalisation(image_folder: Path) -> None:
    cfg = DataConfig(global_crop_size=16, local_crop_size=8, num_local_crops=3)
    crops = MultiCropTransform(cfg)(load_rgb(next(image_folder.rglob("*.png"))))
    assert crops.global_crops.shape == (2, 3, 16, 16)
    assert crops.local_crops.shape == (3, 3, 8, 8)
    assert crops.global_crops.dtype == torch.float32 and crops.global_crops.abs().max() < 10
    # A flat colour with every colour augmentation off: each crop is that colour, so every
    # pixel must be exactly (colour / 255 - mean) / std with data.mean and data.std per channel
    # (a missing or mis-ordered normalisation leaves colour / 255 or something else).
    colour, mean, std = (200, 30, 90), (0.5, 0.25, 0.125), (0.25, 0.5, 2.0)
    plain = DataConfig(
        global_crop_size=16,
        local_crop_size=8,
        num_local_crops=3,
        mean=mean,
        std=std,
        color_jitter_prob=0.0,
        grayscale_prob=0.0,
        global_blur_prob=(0.0, 0.0),
        local_blur_prob=0.0,
        solarize_prob=0.0,
    )
    flat = MultiCropTransform(plain)(Image.new("RGB", (32, 32), colour))
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, mean, std)]).view(3, 1, 1)
    for view in (*flat.global_crops, *flat.local_crops):
        torch.testing.assert_close(view, expected.expand_as(view), atol=1e-5, rtol=0)


def _sharpness(crops: torch.Tensor) -> float:
    """Mean absolute difference between horizontally adjacent pixels."""
    return float((crops[..., 1:] - crops[..., :-1]).abs().mean())


def test_blur_probabilities_come_from_the_config() -> None:
    # A fine checkerboard, cropped whole: blur (always on for global crop 1 by default) averages
    # it away; with data.global_blur_prob [0, 0] the same seed gives the same crop, still sharp.
    board = Image.fromarray((np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    kwargs = dict(global_crop_size=32, local_crop_size=16, num_local_crops=2, global_crop_scale=(1.0, 1.0))
    official = MultiCropTransform(DataConfig(**kwargs))
    sharp = MultiCropTransform(DataConfig(**kwargs, global_blur_prob=(0.0, 0.0), local_blur_prob=0.0))
    for seed in range(4):
        blurred = transform_seeded(official, board, seed).global_crops[0]
        kept = transform_seeded(sharp, board, seed).global_crops[0]
        assert _sharpness(kept) > 2 * _sharpness(blurred)


def test_colour_augmentation_comes_from_the_config() -> None:
    # A flat red image: grayscale p=1 makes every crop grey (equal channels before the
    # normalisation); no jitter and no grayscale keep the crops exactly red; hue jitter alone
    # changes which channel dominates in some crops.
    red = Image.new("RGB", (32, 32), (200, 30, 30))
    kwargs = dict(
        global_crop_size=16, local_crop_size=8, num_local_crops=2, mean=(0, 0, 0), std=(1, 1, 1), solarize_prob=0.0
    )
    grey = MultiCropTransform(DataConfig(**kwargs, grayscale_prob=1.0))
    plain = MultiCropTransform(DataConfig(**kwargs, color_jitter_prob=0.0, grayscale_prob=0.0))
    hue = MultiCropTransform(DataConfig(**kwargs, color_jitter=(0, 0, 0, 0.5), color_jitter_prob=1.0, grayscale_prob=0))
    dominant = set()
    for seed in range(6):
        g = transform_seeded(grey, red, seed).global_crops
        assert torch.allclose(g[:, 0], g[:, 1], atol=1e-6) and torch.allclose(g[:, 1], g[:, 2], atol=1e-6)
        p = transform_seeded(plain, red, seed).global_crops
        assert torch.allclose(p[:, 0], torch.full_like(p[:, 0], 200 / 255), atol=1e-3)
        dominant |= set(transform_seeded(hue, red, seed).global_crops.mean(dim=(2, 3)).argmax(dim=1).tolist())
    assert dominant != {0}


def test_augmentation_probabilities_are_checked() -> None:
    with pytest.raises(ConfigError, match="data.global_blur_prob"):
        DataConfig(global_blur_prob=(1.5, 0.0))
    with pytest.raises(ConfigError, match="data.solarize_prob"):
        DataConfig(solarize_prob=-0.1)
    with pytest.raises(ConfigError, match="data.grayscale_prob"):
        DataConfig(grayscale_prob=2.0)
    with pytest.raises(ConfigError, match="data.color_jitter"):
        DataConfig(color_jitter=(0.4, 0.4, 0.2, 0.7))


class TestInfiniteSampler:
    def test_epochs_are_permutations_and_resume_exactly(self) -> None:
        full = InfiniteSampler(10, seed=3)
        it = iter(full)
        keys = [next(it) for _ in range(25)]
        stream = [index for index, _ in keys]
        assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
        assert stream[:10] != stream[10:20]
        seeds = [seed for _, seed in keys]
        assert len(set(seeds)) == 25  # every draw of an image gets its own augmentation seed
        resumed = iter(InfiniteSampler(10, seed=3, start=13))
        assert [next(resumed) for _ in range(12)] == keys[13:25]

    def test_ranks_partition_each_epoch(self) -> None:
        parts = []
        for rank in range(3):
            it = iter(InfiniteSampler(9, seed=0, rank=rank, world_size=3))
            parts += [next(it) for _ in range(3)]
        assert sorted(index for index, _ in parts) == list(range(9))
        single = iter(InfiniteSampler(9, seed=0))
        assert sorted(parts) == sorted(next(single) for _ in range(9))  # same images, same seeds


def test_seeded_samples_are_reproducible(image_folder: Path) -> None:
    cfg = DataConfig(global_crop_size=16, local_crop_size=8, num_local_crops=2)
    dataset = ImageFolder(image_folder, MultiCropTransform(cfg))
    collate = MultiCropCollate(MaskConfig(probability=1.0), grid=4)
    a, b = dataset[(3, 1234)], dataset[(3, 1234)]
    assert torch.equal(a.view.global_crops, b.view.global_crops) and torch.equal(a.view.local_crops, b.view.local_crops)
    assert not torch.equal(a.view.global_crops, dataset[(3, 99)].view.global_crops)
    # an image's masks depend on its seed, not on its batch neighbours
    alone = collate([a]).mask
    together = collate([dataset[(5, 7)], b]).mask.view(2, 2, -1)[:, 1]
    assert torch.equal(alone, together)


def test_device_pipeline_batches_are_uint8_until_the_device_finishes_them(image_folder: Path) -> None:
    """Workers cut uint8 crops with a parameter row each; ``DeviceAugment`` makes the float crops the
    model sees; an unreadable file is still skipped and passed on."""
    from ibot.config import load_config
    from ibot.data.loaders import build_train_loader
    from ibot.data.photometric import NUM_PARAMS, DeviceAugment
    from ibot.data.pipeline import build_pipeline

    (image_folder / "class_0" / "broken.png").write_bytes(b"\x89PNG not really")
    overrides = [f"data.path={image_folder}", "data.index_cache=", "data.batch_size=17", "data.num_workers=0"]
    overrides += ["data.global_crop_size=16", "data.local_crop_size=8", "data.num_local_crops=3"]
    overrides += ["model.patch_size=4", "data.pipeline=device"]
    cfg = load_config(None, overrides)
    loader, _ = build_train_loader(cfg)
    batch = next(iter(loader))
    assert [s.path.endswith("broken.png") for s in batch.skipped] == [True]
    assert batch.global_crops.dtype == batch.local_crops.dtype == torch.uint8
    assert batch.global_crops.shape == (32, 3, 16, 16) and batch.local_crops.shape == (48, 3, 8, 8)
    assert batch.global_params.shape == (32, NUM_PARAMS) and batch.local_params.shape == (48, NUM_PARAMS)
    done = DeviceAugment(cfg.data)(batch)
    assert done.global_crops.dtype == torch.float32 and done.global_crops.shape == (32, 3, 16, 16)
    assert done.global_params is None and torch.equal(done.mask, batch.mask)
    # normalised: a pixel of 0 or 255 maps to (0 - mean) / std or (1 - mean) / std at most
    std, mean = torch.tensor(cfg.data.std), torch.tensor(cfg.data.mean)
    assert (done.local_crops.amax(dim=(0, 2, 3)) <= (1 - mean) / std + 1e-5).all()
    assert (done.local_crops.amin(dim=(0, 2, 3)) >= -mean / std - 1e-5).all()
    assert build_pipeline(replace(cfg.data, pipeline="pil")).device_step(done) is done  # pil: the identity


def test_jfif_avif_tga_and_other_pillow_formats_are_listed_and_read(tmp_path: Path) -> None:
    from PIL import features

    from ibot.data.decode import decode_rgb
    from ibot.data.skips import UNSUPPORTED_FORMAT, Skip

    colour = (200, 40, 90)
    formats = {".jfif": "JPEG", ".jpe": "JPEG", ".tga": "TGA", ".pnm": "PPM", ".pbm": "PPM"}
    if features.check("avif"):  # Pillow >= 11.3 wheels
        formats[".avif"] = "AVIF"
    for ext, fmt in formats.items():
        Image.new("RGB", (24, 24), colour).save(tmp_path / f"x{ext}", format=fmt)
    (tmp_path / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    index = ImageFolderIndex.scan(tmp_path)
    assert sorted(Path(p).name for p in index.paths) == sorted([*(f"x{e}" for e in formats), "phone.heic"])
    for ext in formats:
        image = decode_rgb(str(tmp_path / f"x{ext}"), f"x{ext}")
        assert not isinstance(image, Skip) and image.size == (24, 24)
        assert np.abs(np.asarray(image, dtype=float).mean((0, 1)) - colour).max() < 8, ext
    if ".heic" not in Image.registered_extensions():  # no HEIF plugin: counted, with the reason
        assert decode_rgb(str(tmp_path / "phone.heic"), "phone.heic") == Skip("phone.heic", UNSUPPORTED_FORMAT)
    (tmp_path / "fake.png").write_bytes(b"not a png")  # a format Pillow has: just not an image
    assert decode_rgb(str(tmp_path / "fake.png"), "fake.png").reason == "not an image"


def test_jfif_and_jpe_take_the_jpeg_path() -> None:
    from ibot.data.datasets import _is_jpeg

    assert all(_is_jpeg("path", f"a{ext}") for ext in (".jpg", ".JPEG", ".jfif", ".jpe"))
    assert not _is_jpeg("path", "a.png")
