"""Caches that cannot lie: the feature cache and the file-index cache answer only for the data
they were made from, and a cache file that does not load is replaced, never fatal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibot.cli import main
from ibot.config import Config
from ibot.data.datasets import ImageFolderIndex
from ibot.eval.features import Features, extract_features
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime
from ibot.storage import TEACHER_NAME, save_backbone

from conftest import make_image_folder


def _extract(cfg: Config, folder: Path, cache: Path, backbone: MaskedViT) -> Features:
    return extract_features(backbone, str(folder), cfg, Runtime.resolve(cfg.train), 0, False, cache_dir=cache)


def _backbone(cfg: Config) -> MaskedViT:
    torch.manual_seed(0)
    return MaskedViT.from_config(cfg.model, 16).eval()


def _counting(backbone: MaskedViT) -> list[int]:
    calls: list[int] = []
    original = backbone.forward_intermediates
    backbone.forward_intermediates = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
    return calls


def test_images_overwritten_under_the_same_names_are_encoded_again(
    tiny_config: Config, image_folder: Path, tmp_path: Path
) -> None:
    backbone = _backbone(tiny_config)
    first = _extract(tiny_config, image_folder, tmp_path / "cache", backbone)
    # Other colours under the same 16 names: the folder's own time and image count do not change.
    make_image_folder(tmp_path / "other", seed=7)
    for new in sorted((tmp_path / "other").rglob("*.png")):
        target = image_folder / new.relative_to(tmp_path / "other")
        target.write_bytes(new.read_bytes())
    calls = _counting(backbone)
    again = _extract(tiny_config, image_folder, tmp_path / "cache", backbone)
    assert calls, "the overwritten images were read from the cache"
    fresh = _extract(tiny_config, image_folder, tmp_path / "fresh", _backbone(tiny_config))
    assert not torch.equal(again.cls, first.cls) and torch.equal(again.cls, fresh.cls)


def test_another_class_list_is_another_cache_entry(tiny_config: Config, image_folder: Path, tmp_path: Path) -> None:
    from ibot.data.labels import TrainClasses

    backbone = _backbone(tiny_config)
    runtime = Runtime.resolve(tiny_config.train)
    own = _extract(tiny_config, image_folder, tmp_path / "cache", backbone)
    mapped = extract_features(
        backbone,
        str(image_folder),
        tiny_config,
        runtime,
        0,
        False,
        cache_dir=tmp_path / "cache",
        train=TrainClasses("train", ("class_1", "class_0")),
    )
    assert own.classes == ("class_0", "class_1") and mapped.classes == ("class_1", "class_0")
    assert torch.equal(mapped.labels, 1 - own.labels)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def _nested(root: Path) -> Path:
    """Two classes, each with images at depth 1 and in a ``nested`` folder at depth 2."""
    for name, colour in (("dog", 40), ("bird", 200)):
        for folder in (root / name, root / name / "nested"):
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.new("RGB", (16, 16), (colour, 20 * i, 0)).save(folder / f"{i:03d}.png")
    return root


def test_the_index_cache_sees_changes_at_any_depth(tmp_path: Path) -> None:
    root = _nested(tmp_path / "images")
    cache = tmp_path / "cache"
    assert len(ImageFolderIndex.scan(root, cache).paths) == 12
    for i in range(5):
        Image.new("RGB", (16, 16), (40, 0, 200)).save(root / "dog" / "nested" / f"new{i}.png")
    (root / "bird" / "nested" / "000.png").unlink()
    (root / "bird" / "nested" / "001.png").unlink()
    deeper = root / "bird" / "nested" / "deeper"
    deeper.mkdir()
    Image.new("RGB", (16, 16)).save(deeper / "x.png")
    cached = ImageFolderIndex.scan(root, cache)
    assert cached == ImageFolderIndex.scan(root)  # what a fresh walk lists
    assert len(cached.paths) == 12 + 5 - 2 + 1
    (deeper / "x.png").unlink()  # depth 3: only that folder's time changes
    assert ImageFolderIndex.scan(root, cache).paths == ImageFolderIndex.scan(root).paths
    assert len(list(cache.glob("index-v3-*.json"))) == 1


def test_the_index_cache_is_keyed_on_the_extensions_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release that lists other formats must list the folder again, not reuse the old list."""
    import ibot.data.datasets as datasets
    import ibot.data.scan as scan

    root = _nested(tmp_path / "images")
    (root / "dog" / "a.tga").write_bytes(b"")  # listed now; a release without .tga would not list it
    cache = tmp_path / "cache"
    with_tga = ImageFolderIndex.scan(root, cache).paths
    fewer = tuple(e for e in scan.IMAGE_EXTENSIONS if e != ".tga")
    monkeypatch.setattr(scan, "IMAGE_EXTENSIONS", fewer)
    monkeypatch.setattr(datasets, "IMAGE_EXTENSIONS", fewer)
    without = ImageFolderIndex.scan(root, cache).paths
    assert len(without) == len(with_tga) - 1 and not any(p.endswith(".tga") for p in without)


@pytest.mark.parametrize("content", [b"\x00\xff garbage", b'{"fingerprint": [["", "x"]], "payload": 3}', b""])
def test_an_index_cache_that_does_not_load_means_a_new_scan(tmp_path: Path, content: bytes) -> None:
    root = _nested(tmp_path / "images")
    cache = tmp_path / "cache"
    first = ImageFolderIndex.scan(root, cache)
    (entry,) = cache.glob("index-*.json")
    entry.write_bytes(content)
    assert ImageFolderIndex.scan(root, cache) == first
    assert json.loads(entry.read_text())["payload"]["paths"] == [str(Path(p).relative_to(root)) for p in first.paths]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_feature_cache_file_that_does_not_load_is_replaced(
    tiny_config: Config, image_folder: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    backbone = _backbone(tiny_config)
    first = _extract(tiny_config, image_folder, tmp_path / "cache", backbone)
    (entry,) = (tmp_path / "cache").glob("*.safetensors")
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2] if damage == "truncated" else np.random.bytes(len(data)))
    with caplog.at_level(logging.WARNING):
        again = _extract(tiny_config, image_folder, tmp_path / "cache", backbone)
    warned = [r.getMessage() for r in caplog.records if "feature cache" in r.getMessage()]
    assert len(warned) == 1 and str(entry) in warned[0] and "\n" not in warned[0]
    assert torch.equal(again.cls, first.cls) and torch.equal(again.labels, first.labels)
    calls = _counting(backbone)
    assert torch.equal(_extract(tiny_config, image_folder, tmp_path / "cache", backbone).cls, first.cls)
    assert not calls  # the entry written again loads


def test_cached_evals_go_on_after_a_corrupted_features_folder(
    tiny_config: Config, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    save_backbone(run / TEACHER_NAME, _backbone(tiny_config).state_dict(), tiny_config.to_dict())
    argv = ["eval", "knn", str(run), "--train-dir", str(image_folder), "--test-dir", str(image_folder)]
    argv += ["--no-progress", "data.num_workers=0", "eval.knn_k=[1]"]
    assert main(argv) == 0
    before = json.loads((run / "eval" / "knn.json").read_text())
    for entry in (run / "features").glob("*.safetensors"):
        entry.write_bytes(b"not safetensors")
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    after = json.loads((run / "eval" / "knn.json").read_text())
    assert after["knn"] == before["knn"] == {"1": {"top1": 100.0, "top5": 100.0}}
