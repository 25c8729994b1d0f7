"""Probes on synthetic frozen tokens where the right answer is known, and the feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ibot.config import Config
from ibot.eval.features import Features, extract_features
from ibot.eval.probes import PROBES, build_probe, train_probes
from ibot.models.vit import MaskedViT
from ibot.runtime import Runtime


def one_patch_tokens(num: int, seed: int, classes: int = 4, patches: int = 16, dim: int = 16) -> Features:
    """The label lives in one random patch (a marker direction plus a class direction); the
    [cls] tokens are pure noise and the other patches too."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(123)))[0]
    marker, class_dirs = directions[0], directions[1 : 1 + classes]
    labels = torch.randint(0, classes, (num,), generator=g)
    tokens = torch.randn(num, patches, dim, generator=g)
    where = torch.randint(0, patches, (num,), generator=g)
    tokens[torch.arange(num), where] += 4 * marker + 4 * class_dirs[labels]
    cls = torch.randn(num, 4, dim, generator=g)
    return Features(cls=cls, labels=labels, patches=tokens.half())


def test_attention_pooling_finds_the_patch_that_carries_the_label() -> None:
    results = {
        r.probe: r
        for r in train_probes(
            one_patch_tokens(1200, 0),
            one_patch_tokens(400, 1),
            ("cls", "mean-pool", "attention-pool"),
            lrs=(3e-3, 1e-2),
            epochs=20,
            batch_size=64,
            progress=False,
        )
    }
    assert results["attention-pool"].test_top1 > 90
    assert results["cls"].test_top1 < 40  # chance is 25 %
    assert results["attention-pool"].test_top1 > results["mean-pool"].test_top1 + 10
    # its pooling weights concentrate on the marked patch
    test = one_patch_tokens(8, 1)
    weights = results["attention-pool"].module.attention(test.patches.float())
    assert weights.max(dim=1).values.mean() > 0.5


def test_learning_rate_is_picked_on_validation() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=g)
    cls = torch.randn(600, 1, 8, generator=g)
    cls[:, 0, :3] += 3 * torch.nn.functional.one_hot(labels, 3)
    data = Features(cls=cls, labels=labels, patches=torch.randn(600, 4, 8, generator=g).half())
    train, test = (
        Features(f.cls[s], f.labels[s], f.patches[s]) for f, s in ((data, slice(0, 400)), (data, slice(400, 600)))
    )
    (result,) = train_probes(train, test, ("cls",), lrs=(1e-7, 3e-2), epochs=10, batch_size=32, progress=False)
    assert result.lr == 3e-2 and result.test_top1 > 95 and result.val_top1 > 95


@pytest.mark.parametrize("name", PROBES)
def test_every_probe_gives_class_logits(name: str) -> None:
    probe = build_probe(name, num_blocks=4, dim=12, num_classes=5)
    assert probe(torch.randn(3, 4, 12), torch.randn(3, 9, 12)).shape == (3, 5)


def test_feature_cache_is_keyed_by_the_weights(tiny_config: Config, image_folder: Path, tmp_path: Path) -> None:
    runtime = Runtime.resolve(tiny_config.train)
    torch.manual_seed(0)
    backbone = MaskedViT.from_config(tiny_config.model, 16).eval()
    first = extract_features(backbone, str(image_folder), tiny_config, runtime, 0, False, 2, True, tmp_path)
    assert first.cls.shape == (16, 2, backbone.embed_dim) and first.patches.shape == (16, 16, backbone.embed_dim)
    calls = []
    original = backbone.forward_intermediates
    backbone.forward_intermediates = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
    again = extract_features(backbone, str(image_folder), tiny_config, runtime, 0, False, 2, True, tmp_path)
    assert not calls and torch.equal(again.cls, first.cls) and torch.equal(again.patches, first.patches)
    with torch.no_grad():
        backbone.vit.cls_token.add_(1.0)  # other weights: a new entry, computed afresh
    changed = extract_features(backbone, str(image_folder), tiny_config, runtime, 0, False, 2, True, tmp_path)
    assert calls and not torch.equal(changed.cls, first.cls)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
