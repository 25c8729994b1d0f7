"""``ibot embed``: rows equal to ``encode`` of the same images, chunked writes, skips, atomicity, extras."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ibot.cli import main
from ibot.config import Config
from ibot.data.decode import load_rgb
from ibot.data.transforms import build_eval_transform
from ibot.errors import IBOTError
from ibot.eval import embed as embed_module
from ibot.eval.embed import EmbedRequest, read_sidecar, run_embed
from ibot.eval.features import encode, load_frozen
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime
from ibot.storage import TEACHER_NAME, save_backbone

from conftest import make_image_folder


@pytest.fixture
def tiny_run(tiny_config: Config, tmp_path: Path) -> Path:
    """A run folder holding a seeded, untrained tiny backbone: embedding needs weights, not training."""
    torch.manual_seed(0)
    backbone = MaskedViT.from_config(tiny_config.model, 16)
    run = tmp_path / "run"
    save_backbone(run / TEACHER_NAME, backbone.state_dict(), tiny_config.to_dict())
    return run


@pytest.fixture
def messy_folder(image_folder: Path) -> Path:
    """16 images in 2 classes, a truncated PNG, text named like a JPEG, and a text file the scan ignores."""
    good = (image_folder / "class_0" / "000.png").read_bytes()
    (image_folder / "class_0" / "broken.png").write_bytes(good[: len(good) // 2])
    (image_folder / "class_1" / "fake.jpg").write_text("not an image")
    (image_folder / "notes.txt").write_text("not scanned")
    return image_folder


DIM = 48  # vit_pico
READABLE = [f"class_{c}/{i:03d}.png" for c in range(2) for i in range(8)]


def expected_embeddings(run: Path, folder: Path, pool: str = "cls") -> np.ndarray:
    """``encode`` of the readable images, in folder order, through the evaluation transform."""
    frozen = load_frozen(str(run), on_cpu=True)
    backbone, cfg = frozen.backbone, frozen.cfg
    transform = build_eval_transform(cfg.eval_image_size, cfg.eval.crop_ratio, cfg.data.mean, cfg.data.std)
    images = torch.stack([transform(load_rgb(folder / name)) for name in READABLE])
    encoded = encode(backbone, images, Runtime.resolve(cfg.train), patch_dtype=torch.float32)
    return (encoded.patches.mean(1) if pool == "mean" else encoded.cls[:, -1]).numpy()


def request(run: Path, folder: Path, out: Path, **options) -> EmbedRequest:  # type: ignore[no-untyped-def]
    return EmbedRequest(str(run), str(folder), str(out), num_workers=0, progress=False, **options)


def test_parquet_rows_equal_encode_in_row_groups(tiny_run: Path, messy_folder: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "out" / "emb.parquet"
    result = run_embed(request(tiny_run, messy_folder, out, chunk_rows=5, batch_size=4))
    table = pq.read_table(out)
    assert table.column_names == ["path", "label", "label_index", "embedding"]
    assert table.column("path").to_pylist() == READABLE
    assert table.column("label").to_pylist() == ["class_0"] * 8 + ["class_1"] * 8
    assert table.column("label_index").to_pylist() == [0] * 8 + [1] * 8
    embeddings = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(embeddings, expected_embeddings(tiny_run, messy_folder), rtol=1e-5, atol=1e-5)
    assert pq.ParquetFile(out).metadata.num_row_groups == 4  # 5 + 5 + 5 + 1 rows
    assert result["images"] == 16 and result["skipped_images"] == 2
    listed = (tmp_path / "out" / "emb.parquet.skipped.tsv").read_text()
    assert "broken.png\tunreadable or truncated" in listed and "fake.jpg\tnot an image" in listed
    assert "notes.txt" not in listed
    # One chunk for everything: one row group, the same rows.
    whole = tmp_path / "whole.parquet"
    run_embed(request(tiny_run, messy_folder, whole))
    assert pq.ParquetFile(whole).metadata.num_row_groups == 1
    assert pq.read_table(whole).equals(table)


def test_npy_rows_equal_encode_with_mean_pool(tiny_run: Path, messy_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.npy"
    run_embed(request(tiny_run, messy_folder, out, pool="mean", chunk_rows=3, batch_size=5))
    array = np.load(out)
    # Preallocated for the 18 scanned files, shrunk to the 16 readable ones.
    assert array.shape == (16, DIM) and array.dtype == np.float32
    assert out.stat().st_size == 128 + 16 * DIM * 4
    np.testing.assert_allclose(array, expected_embeddings(tiny_run, messy_folder, "mean"), rtol=1e-5, atol=1e-5)
    rows = read_sidecar(tmp_path / "emb.npy.paths.tsv")
    assert [r[0] for r in rows] == READABLE
    assert rows[0][1:] == ("class_0", 0) and rows[-1][1:] == ("class_1", 1)
    assert (tmp_path / "emb.npy.skipped.tsv").is_file()


def test_a_folder_without_classes_has_no_labels(tiny_run: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    make_image_folder(tmp_path / "made", classes=1, per_class=3)
    (tmp_path / "made" / "class_0").rename(flat)
    out = tmp_path / "flat.npy"
    run_embed(request(tiny_run, flat, out))
    assert read_sidecar(tmp_path / "flat.npy.paths.tsv") == [(f"{i:03d}.png", None, -1) for i in range(3)]
    assert not (tmp_path / "flat.npy.skipped.tsv").exists()  # nothing skipped: no list


def test_rows_are_named_relative_to_a_relative_images_folder(
    tiny_run: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(image_folder.parent)
    run_embed(request(tiny_run, Path(image_folder.name), tmp_path / "rel.npy"))
    names = [row[0] for row in read_sidecar(tmp_path / "rel.npy.paths.tsv")]
    assert names[0] == "class_0/000.png" and all(not n.startswith(image_folder.name) for n in names)


def test_an_existing_output_needs_force(tiny_run: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.npy"
    out.write_bytes(b"keep me")
    with pytest.raises(IBOTError, match="--force") as info:
        run_embed(request(tiny_run, image_folder, out))
    assert "\n" not in str(info.value) and out.read_bytes() == b"keep me"
    run_embed(request(tiny_run, image_folder, out, force=True))
    assert np.load(out).shape == (16, DIM)


def test_an_interrupted_embed_leaves_no_file(
    tiny_run: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "emb.npy").write_bytes(b"old")
    calls = []

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:  # after one chunk is on disk
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = embed_module.embed_images
    monkeypatch.setattr(embed_module, "embed_images", interrupted)
    for name in ("emb.npy", "emb.parquet"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            run_embed(request(tiny_run, image_folder, out_dir / name, force=True, chunk_rows=4, batch_size=4))
    assert sorted(p.name for p in out_dir.iterdir()) == ["emb.npy"]  # no temporary file, no sidecar
    assert (out_dir / "emb.npy").read_bytes() == b"old"
    # A killed writer (SIGKILL: no cleanup) leaves its temporary file; the next run removes it.
    debris = out_dir / ".emb.npy.999999999.tmp"
    debris.write_bytes(b"half")
    monkeypatch.setattr(embed_module, "embed_images", real)
    run_embed(request(tiny_run, image_folder, out_dir / "emb.npy", force=True))
    assert sorted(p.name for p in out_dir.iterdir()) == ["emb.npy", "emb.npy.paths.tsv"]


def test_a_missing_extra_is_named(
    tiny_run: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(IBOTError, match=r"pip install 'ibot\[embed\]'") as info:
        run_embed(request(tiny_run, image_folder, tmp_path / "emb.parquet"))
    assert "\n" not in str(info.value)
    run_embed(request(tiny_run, image_folder, tmp_path / "emb.npy"))  # .npy needs numpy alone


def test_cli_round_trip(tiny_run: Path, messy_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "cli.parquet"
    argv = ["embed", str(tiny_run), "--images", str(messy_folder), "--out", str(out), "--no-progress"]
    assert main([*argv, "--batch-size", "8", "data.num_workers=0"]) == 0
    assert f"wrote 16 embeddings (dim {DIM}, pool cls)" in capsys.readouterr().out
    assert pq.read_table(out).num_rows == 16
    assert main(argv) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--force", "--pool", "mean"]) == 0
    assert "pool mean" in capsys.readouterr().out
    assert main([*argv[:-1], "--out", str(tmp_path / "emb.csv")]) == 2
    assert ".parquet or .npy" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["emb.npy", "emb.parquet"])
def test_an_existing_side_file_needs_force_and_nothing_is_written(
    tiny_run: Path, messy_folder: Path, tmp_path: Path, name: str
) -> None:
    out = tmp_path / name
    sides = [embed_module.skipped_path(out)] + ([embed_module.sidecar_path(out)] if name.endswith(".npy") else [])
    for side in sides:
        side.write_text("keep me")
        with pytest.raises(IBOTError, match=f"{side.name}: already exists; pass --force") as info:
            run_embed(request(tiny_run, messy_folder, out))
        assert "\n" not in str(info.value)
        assert side.read_text() == "keep me" and not out.exists()  # checked before anything is written
        side.unlink()
    run_embed(request(tiny_run, messy_folder, out))
    assert out.is_file()


def test_npy_and_parquet_outputs_keep_their_own_side_files(tiny_run: Path, messy_folder: Path, tmp_path: Path) -> None:
    run_embed(request(tiny_run, messy_folder, tmp_path / "emb.parquet"))
    run_embed(request(tiny_run, messy_folder, tmp_path / "emb.npy"))  # no --force: it overwrites nothing
    assert sorted(p.name for p in tmp_path.glob("emb*")) == [
        "emb.npy",
        "emb.npy.paths.tsv",
        "emb.npy.skipped.tsv",
        "emb.parquet",
        "emb.parquet.skipped.tsv",
    ]
    for out in ("emb.npy", "emb.parquet"):
        assert "fake.jpg\tnot an image" in (tmp_path / f"{out}.skipped.tsv").read_text()


def expected_patch_grids(run: Path, folder: Path) -> np.ndarray:
    """``encode``'s fp32 patch tokens of the readable images, on their (h, w) grid."""
    frozen = load_frozen(str(run), on_cpu=True)
    backbone, cfg = frozen.backbone, frozen.cfg
    transform = build_eval_transform(cfg.eval_image_size, cfg.eval.crop_ratio, cfg.data.mean, cfg.data.std)
    images = torch.stack([transform(load_rgb(folder / name)) for name in READABLE])
    patches = encode(backbone, images, Runtime.resolve(cfg.train), patch_dtype=torch.float32).patches
    side = cfg.eval_image_size // cfg.model.patch_size
    return patches.reshape(len(images), side, side, DIM).numpy()  # type: ignore[union-attr]


def test_patch_pool_writes_fp16_grids_batch_by_batch(
    tiny_run: Path, messy_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    real_write = embed_module._NpySink.write

    def recording(self, rows):  # type: ignore[no-untyped-def]
        written.append(len(rows))
        return real_write(self, rows)

    monkeypatch.setattr(embed_module._NpySink, "write", recording)
    out = tmp_path / "grid.npy"
    result = run_embed(request(tiny_run, messy_folder, out, pool="patch", batch_size=4))
    # 18 scanned files in batches of 4 (4, 4, 3 + broken.png, 4, 1 + fake.jpg readable): each
    # batch goes to the memory map alone, never a larger chunk (chunk_rows is 4,096).
    assert max(written) <= 4 and sum(written) == 16 and len(written) == 5
    array = np.load(out, mmap_mode="r")
    side = 16 // 4  # tiny: 16-px images, patch 4
    assert array.shape == (16, side, side, DIM) and array.dtype == np.float16
    assert out.stat().st_size == 128 + 16 * side * side * DIM * 2  # shrunk from 18 rows
    expected = expected_patch_grids(tiny_run, messy_folder)
    np.testing.assert_allclose(np.asarray(array, np.float32), expected, rtol=1e-3, atol=1e-4)  # fp16 rounding
    assert [r[0] for r in read_sidecar(tmp_path / "grid.npy.paths.tsv")] == READABLE
    listed = (tmp_path / "grid.npy.skipped.tsv").read_text()
    assert "broken.png\tunreadable or truncated" in listed and "fake.jpg\tnot an image" in listed
    assert result["grid"] == [side, side] and result["images"] == 16


def test_patch_pool_refuses_parquet_in_one_line(
    tiny_run: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "grid.parquet"
    argv = ["embed", str(tiny_run), "--images", str(image_folder), "--out", str(out), "--pool", "patch"]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--pool patch" in err and ".npy" in err and err.count("\n") == 1
    assert list(tmp_path.glob("grid*")) == []
    assert main([*argv[:-3], str(tmp_path / "grid.npy"), "--pool", "patch", "--no-progress"]) == 0
    assert "4x4 patches, dim 48, pool patch" in capsys.readouterr().out
