from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from ibot.config import DataConfig, load_config
from ibot.data.loaders import build_dataset
from ibot.data.shards import TarShards
from ibot.data.skips import NOT_AN_IMAGE, Skip
from ibot.data.transforms import MultiCropTransform
from ibot.errors import DataError
from ibot.storage import CHECKPOINT_NAME, load_checkpoint
from ibot.train.loop import train
from ibot.train.metrics import read_metrics

from conftest import tiny_overrides


def write_shards(folder: Path, images: Path, per_shard: int = 5) -> Path:
    """Pack an image folder into WebDataset-style shards: key.png + key.cls."""
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(images.rglob("*.png"))
    classes = sorted({f.parent.name for f in files})
    for start in range(0, len(files), per_shard):
        with tarfile.open(folder / f"shard-{start // per_shard:05d}.tar", "w") as tar:
            for i, f in enumerate(files[start : start + per_shard], start):
                for name, data in (
                    (f"{i:06d}.png", f.read_bytes()),
                    (f"{i:06d}.cls", str(classes.index(f.parent.name)).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def test_shards_index_labels_and_images(image_folder: Path, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", image_folder)
    cfg = DataConfig(global_crop_size=16, local_crop_size=8, num_local_crops=2)
    dataset = build_dataset(str(shards), MultiCropTransform(cfg), "auto", str(tmp_path / "cache"))
    assert isinstance(dataset, TarShards) and len(dataset) == 16
    assert sorted(dataset.labels) == [0] * 8 + [1] * 8
    sample = dataset[(3, 42)]
    assert sample.view.global_crops.shape == (2, 3, 16, 16)
    assert torch.equal(sample.view.global_crops, dataset[(3, 42)].view.global_crops)
    assert len(list((tmp_path / "cache").glob("shards-*.json"))) == 1
    cached = TarShards(shards, MultiCropTransform(cfg), tmp_path / "cache")
    assert cached.entries == dataset.entries


def test_corrupt_member_is_skipped(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (("a.jpg", b"not an image"), ("b.png", _png())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dataset = TarShards(tmp_path / "s.tar", lambda img: img.size)
    results = [dataset[i] for i in range(len(dataset))]
    assert [r for r in results if isinstance(r, Skip)] == [Skip(f"{tmp_path / 's.tar'}:a.jpg", NOT_AN_IMAGE)]


def test_no_shards_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no .tar shards"):
        TarShards(tmp_path, lambda x: x)


def test_pretrain_on_shards(image_folder: Path, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", image_folder)
    cfg = load_config(None, tiny_overrides(shards, tmp_path / "run") + ["train.max_steps=2"])
    result = train(cfg, progress=False)
    assert result.step == 2 and result.skipped_images == 0
    assert result.total_steps == 2 * 16 // 4  # 2 epochs of the 16 images in the shards, batch 4
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 2
    # The shards hold the folder's images in its (sorted) order, and samples are seeded by
    # index, so training on either is the same training: same losses, same weights. Shards
    # that decode other pixels, drop or reorder members, or a run that trained on nothing
    # differ here.
    folder_cfg = load_config(None, tiny_overrides(image_folder, tmp_path / "folder") + ["train.max_steps=2"])
    train(folder_cfg, progress=False)
    folder_rows = read_metrics(tmp_path / "folder" / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in folder_rows]
    a = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["method"]
    b = load_checkpoint(tmp_path / "folder" / CHECKPOINT_NAME)["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()
