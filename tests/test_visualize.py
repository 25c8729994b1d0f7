"""Pictures: the attention they draw is the block's, the clusters, correspondences and PCA colours are right."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ibot.cli import main
from ibot.config import Config, load_config
from ibot.data.skips import SkipLog
from ibot.errors import IBOTError
from ibot.eval.features import build_eval_dataset
from ibot.models.vit import MaskedViT
from ibot.visualize import at_size, cls_attention, draw_pca, kmeans, mutual_neighbours, pca_colours, spread_images

from conftest import make_image_folder, tiny_overrides


def test_last_attention_is_what_the_last_block_uses() -> None:
    torch.manual_seed(0)
    vit = MaskedViT("vit_pico", patch_size=4, img_size=16).eval()
    images = torch.randn(2, 3, 16, 16)
    seen = {}
    last = vit.vit.blocks[-1]
    handle = last.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    vit(images)
    handle.remove()
    y = last.norm1(seen["x"])
    attn = last.attn
    b, n, _ = y.shape
    v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    probs = vit.last_attention(images)  # (B, H, 1+N, 1+N)
    assert probs.shape == (2, 2, 17, 17) and torch.allclose(probs.sum(-1), torch.ones(2, 2, 17))
    rebuilt = attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(b, n, -1)))
    assert torch.allclose(rebuilt, attn(y), atol=1e-5)
    maps = cls_attention(vit, images)
    assert maps.shape == (2, 2, 4, 4) and torch.allclose(maps.flatten(2), probs[:, :, 0, 1:])


def test_kmeans_recovers_separated_directions() -> None:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 6, generator=g), dim=-1)
    labels = torch.arange(3).repeat_interleave(20)
    points = centres[labels] + 0.05 * torch.randn(60, 6, generator=g)
    assign, centroids = kmeans(points, 3)
    for c in range(3):  # each true cluster lands in one k-means cluster, and they differ
        assert assign[labels == c].unique().numel() == 1
    assert assign.unique().numel() == 3
    assert centroids.shape == (3, 6)


def test_mutual_neighbours_pair_each_patch_with_itself_on_identical_tokens() -> None:
    a = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    matches = mutual_neighbours(a, a[torch.tensor([2, 0, 1, 3, 4, 5, 6, 7, 8])], pairs=20)
    found = {i: j for i, j, _ in matches}
    assert found[2] == 0 and found[0] == 1 and found[1] == 2 and found[5] == 5
    assert len(matches) == 9 and all(s > 0.999 for *_, s in matches)
    assert len(mutual_neighbours(a, a, pairs=4)) == 4


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def two_textures(images: int = 2, side: int = 4, dim: int = 8) -> torch.Tensor:
    """(B, side * side, D) tokens: the middle 2x2 patches of each image are "object" (left
    column along e1, right along e2), the border patches "background" (along e0); small noise."""
    g = torch.Generator().manual_seed(0)
    axes = torch.eye(dim)
    grid = torch.zeros(side, side, dtype=torch.long)  # 0: background
    grid[1:3, 1] = 1
    grid[1:3, 2] = 2
    tokens = 5 * axes[grid.flatten()].expand(images, -1, -1)
    return tokens + 0.1 * torch.randn(images, side * side, dim, generator=g)


def test_pca_colours_tell_textures_apart_and_do_not_depend_on_signs() -> None:
    tokens = two_textures()
    rgb = pca_colours(tokens, 4, 4)
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    background, left, right = rgb[:, 0, 0], rgb[:, 1, 1], rgb[:, 1, 2]
    # three textures span two components: the third (blue) is the noise's, scaled to [0, 1]
    for colours in (rgb[:, [0, 3], :, :2].flatten(0, 2), rgb[:, :, [0, 3], :2].flatten(0, 2)):  # the border
        assert torch.allclose(colours, background[0, :2].expand_as(colours), atol=0.1)
    assert (background - left).norm(dim=-1).min() > 0.5 and (left - right).norm(dim=-1).min() > 0.5
    assert torch.allclose(pca_colours(-tokens, 4, 4), rgb, atol=1e-5)  # eigenvector signs are fixed
    assert bool((left[:, 0] > background[:, 0]).all())  # the first component is high in the middle
    assert torch.equal(pca_colours(tokens, 4, 4), rgb)


def test_pca_threshold_blacks_out_the_background_and_refits_on_the_object() -> None:
    tokens = two_textures()
    rgb = pca_colours(tokens, 4, 4, threshold=0.5)
    middle = torch.zeros(4, 4, dtype=torch.bool)
    middle[1:3, 1:3] = True
    assert bool((rgb[:, ~middle] == 0).all())
    left, right = rgb[:, 1:3, 1].flatten(0, 1), rgb[:, 1:3, 2].flatten(0, 1)
    # refitted on the object alone, its first component splits its two halves
    assert (left[:, None] - right[None]).norm(dim=-1).min() > 0.5
    assert torch.allclose(pca_colours(-tokens, 4, 4, threshold=0.5), rgb, atol=1e-5)
    with pytest.raises(IBOTError, match="foreground patches"):
        pca_colours(tokens, 4, 4, threshold=0.9999999)


class PlantedBackbone:
    """Patch tokens = ``two_textures`` for any batch: what the picture draws is known."""

    patch_size = 4

    def __call__(self, images: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(patches=two_textures(len(images), images.shape[-1] // 4))


def test_draw_pca_writes_a_png_of_the_layout_size(tmp_path: Path) -> None:
    images = torch.zeros(3, 3, 16, 16)
    path = draw_pca(PlantedBackbone(), images, Config(), tmp_path / "pca.png")  # type: ignore[arg-type]
    assert png_size(path) == (924, 154)  # 3 pairs of 1.4-inch panels at 110 dpi
    path = draw_pca(PlantedBackbone(), torch.zeros(6, 3, 16, 16), Config(), tmp_path / "t.png", threshold=0.5)  # type: ignore[arg-type]
    assert png_size(path) == (1232, 308)  # 4 pairs a row, 2 rows
    with pytest.raises(IBOTError, match="--threshold 1.5: must be in"):
        draw_pca(PlantedBackbone(), images, Config(), tmp_path / "x.png", threshold=1.5)  # type: ignore[arg-type]


def _one_step_run(tmp_path: Path) -> tuple[Path, Path]:
    """An image folder and a run folder pre-trained one step on it through the CLI."""
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    run = tmp_path / "run"
    args = ["pretrain", "--config", "configs/demo.yaml", "--no-progress", *tiny_overrides(folder, run)]
    assert main([*args, "train.max_steps=1"]) == 0
    return folder, run


def test_visualize_commands_write_pngs(tmp_path: Path) -> None:
    folder, run = _one_step_run(tmp_path)
    for kind in ("attention", "clusters", "correspondences"):
        out = tmp_path / f"{kind}.png"
        extra = ["--clusters", "3"] if kind == "clusters" else []
        assert (
            main(["visualize", kind, str(run), "--images", str(folder), "--count", "4", "--output", str(out), *extra])
            == 0
        )
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 2000
    assert main(["visualize", "attention", str(run), "--images", str(tmp_path / "empty")]) == 2


def test_visualize_pca_at_a_larger_size_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, run = _one_step_run(tmp_path)
    base = ["visualize", "pca", str(run), "--images", str(folder), "--count", "4"]
    for extra in ([], ["--size", "32", "--threshold", "0.3"]):
        out = tmp_path / f"pca{len(extra)}.png"
        assert main([*base, "--output", str(out), *extra]) == 0
        assert png_size(out) == (1232, 154)  # 4 pairs of 1.4-inch panels at 110 dpi
    capsys.readouterr()
    for extra, message in (
        (["--size", "30"], "--size 30: must be a positive multiple of the patch size 4"),
        (["--threshold", "1"], "--threshold 1: must be in [0, 1)"),
    ):
        assert main([*base, "--output", str(tmp_path / "bad.png"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_spread_images_replace_an_unreadable_pick_with_the_next_readable_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)  # 8 files, sorted
    cfg = load_config(None, tiny_overrides(folder, tmp_path / "run"))
    # --count 4 picks sorted indices 0, 2, 5, 7: break the 2nd and 3rd pick
    for name in ("class_0/002.png", "class_1/001.png"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dataset = build_eval_dataset(str(folder), cfg)
    skips = SkipLog()
    images = spread_images(str(folder), cfg, 4, skips)
    expected = torch.stack([dataset[i].view for i in (0, 3, 6, 7)])  # each broken pick -> the next file
    assert torch.equal(images, expected)
    assert sorted(Path(s.path).name for s in skips) == ["001.png", "002.png"]
    # 6 readable of the 8 asked for: all 6, and one line saying so
    with caplog.at_level(logging.WARNING, logger="ibot"):
        assert len(spread_images(str(folder), cfg, 8)) == 6
    assert [r.getMessage() for r in caplog.records if "asked for" in r.getMessage()] == [
        f"{folder}: 6 readable images, fewer than the 8 asked for: drawing those"
    ]


def test_visualize_output_folder_broken_picks_and_size_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, run = _one_step_run(tmp_path)
    (folder / "class_1" / "003.png").write_bytes(b"broken")  # the last file: correspondences' second pick
    monkeypatch.chdir(tmp_path)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    base = [str(run), "--images", str(folder)]
    assert main(["visualize", "correspondences", *base, "--output", "pictures"]) == 0
    assert (pictures / "correspondences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "pictures.png").exists()
    capsys.readouterr()
    for extra, message in (
        (["--output", "picture.jpg"], "--output picture.jpg: must be a .png file or a folder"),
        (["--size", "4096"], "--size 4096: 1024 x 1024 patches of 4 px; at most 64 x 64 (--size 256)"),
    ):
        assert main(["visualize", "attention", *base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert main(["visualize", "attention", *base, "--size", "256", "--count", "1", "--output", "big.png"]) == 0
    assert (tmp_path / "big.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the largest size allowed draws


def test_size_is_bounded_by_the_patch_grid() -> None:
    cfg = Config()
    patch = cfg.model.patch_size
    assert at_size(cfg, 64 * patch).eval.image_size == 64 * patch
    with pytest.raises(IBOTError) as info:
        at_size(cfg, 65 * patch)
    assert str(info.value).startswith(f"--size {65 * patch}: 65 x 65 patches of {patch} px; at most 64 x 64")


def test_a_refused_picture_leaves_the_run_folder_as_it_was(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing readable, or a bad --threshold found once the images are drawn: one line (the skip
    counts in it), and no skip list or anything else written into the run folder."""
    folder, run = _one_step_run(tmp_path)
    broken = tmp_path / "broken" / "a"
    broken.mkdir(parents=True)
    (broken / "text.jpg").write_text("not an image\n")
    (broken / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "class_0" / "zz.png").write_bytes(b"broken")  # a skip to list, had the picture been drawn
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    capsys.readouterr()
    assert main(["visualize", "pca", str(run), "--images", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no readable images to draw" in err and "skipped 2 files" in err and "\n" not in err, err
    assert main(["visualize", "pca", str(run), "--images", str(folder), "--threshold", "1"]) == 2
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
