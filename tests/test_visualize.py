"""Pictures: the attention they draw is the block's, the clusters and correspondences are right."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ibot.cli import main
from ibot.models.vit import MaskedViT
from ibot.visualize import cls_attention, kmeans, mutual_neighbours

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


def test_visualize_commands_write_pngs(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--config",
                "configs/demo.yaml",
                "--no-progress",
                *tiny_overrides(folder, run),
                "train.max_steps=1",
            ]
        )
        == 0
    )
    for kind in ("attention", "clusters", "correspondences"):
        out = tmp_path / f"{kind}.png"
        extra = ["--clusters", "3"] if kind == "clusters" else []
        assert (
            main(["visualize", kind, str(run), "--images", str(folder), "--count", "4", "--output", str(out), *extra])
            == 0
        )
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 2000
    assert main(["visualize", "attention", str(run), "--images", str(tmp_path / "empty")]) == 2
