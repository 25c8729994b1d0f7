"""Probes on synthetic frozen tokens where the right answer is known, and the feature cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ibot.config import Config
from ibot.eval.dense import DenseResult
from ibot.eval.features import Features, extract_features
from ibot.eval.probes import PROBES, beyond, build_probe, sweep, train_probes
from ibot.eval.results import DenseReport, ProbeReport, format_dense, format_lr, format_probe
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
            max_extensions=0,
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
    (result,) = train_probes(
        train, test, ("cls",), lrs=(1e-7, 3e-2), epochs=10, batch_size=32, progress=False, max_extensions=0
    )
    assert result.lr == 3e-2 and result.test_top1 > 95 and result.val_top1 > 95
    assert result.lr_edge == "upper" and result.extended == 0  # not extended: marked as a lower bound


def test_lr_steps_beyond_an_edge_on_the_half_decade_grid() -> None:
    assert [beyond(lr, "upper") for lr in (0.1, 0.3, 0.02, 1.0)] == [0.3, 1.0, 0.03, 3.0]
    assert [beyond(lr, "lower") for lr in (1e-3, 3e-4, 0.05)] == [3e-4, 1e-4, 0.03]


class _AtLr(torch.nn.Module):
    """A stand-in probe whose validation score depends only on the lr it was trained at."""

    lr = 0.0


def _planted_sweep(lrs: tuple[float, ...], best: float, max_extensions: int, trained: list[float]):  # type: ignore[no-untyped-def]
    def train(modules: list[torch.nn.Module], rates: list[float]) -> None:
        trained.extend(rates)
        for m, lr in zip(modules, rates):
            m.lr = lr

    def score(modules: list[torch.nn.Module]) -> list[float]:
        return [-((math.log10(m.lr) - math.log10(best)) ** 2) for m in modules]

    return sweep(("a",), lrs, lambda name: _AtLr(), train, score, max_extensions)["a"]


def test_a_pick_on_the_top_edge_extends_the_grid_until_it_is_inside() -> None:
    trained: list[float] = []
    pick = _planted_sweep((1e-3, 1e-2, 3e-2), best=0.3, max_extensions=5, trained=trained)
    assert trained == [1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]  # one new lr per round, stops once inside
    assert pick.trial.lr == 0.3 and pick.extended == 3 and pick.edge is None
    capped = _planted_sweep((1e-3, 1e-2, 3e-2), best=0.3, max_extensions=2, trained=[])
    assert capped.trial.lr == 0.3 and capped.extended == 2 and capped.edge == "upper"
    low = _planted_sweep((1e-2, 1e-1), best=1e-3, max_extensions=3, trained=[])
    assert low.trial.lr == 1e-3 and low.extended == 3 and low.tried[0] == 3e-4 and low.edge is None


def test_a_pick_inside_the_grid_does_not_extend() -> None:
    trained: list[float] = []
    pick = _planted_sweep((1e-3, 1e-2, 1e-1), best=1e-2, max_extensions=3, trained=trained)
    assert trained == [1e-3, 1e-2, 1e-1] and pick.trial.lr == 1e-2 and pick.extended == 0 and pick.edge is None


def test_probes_extend_a_grid_that_is_too_low_and_mark_it() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (1000,), generator=g)
    cls = torch.randn(1000, 1, 8, generator=g)
    cls[:, 0, :3] += 2 * torch.nn.functional.one_hot(labels, 3)
    data = Features(cls=cls, labels=labels, patches=torch.randn(1000, 4, 8, generator=g).half())
    train, test = (
        Features(f.cls[s], f.labels[s], f.patches[s]) for f, s in ((data, slice(0, 800)), (data, slice(800, 1000)))
    )
    # one epoch of 18 steps: at lr 1e-4 or 1e-3 the head barely leaves its random init
    sweep_args = {"lrs": (1e-4, 1e-3), "epochs": 1, "batch_size": 32, "val_fraction": 0.25, "progress": False}
    (stuck,) = train_probes(train, test, ("cls",), **sweep_args, max_extensions=0)
    assert stuck.lr == 1e-3 and stuck.lr_edge == "upper" and stuck.extended == 0 and stuck.test_top1 < 40
    (result,) = train_probes(train, test, ("cls",), **sweep_args, max_extensions=6)
    assert result.lr >= 0.1 and result.extended >= 4 and result.lr_edge is None and result.test_top1 > 80
    row = result.as_dict()
    assert row["extended"] == result.extended and row["lr_edge"] is None
    table = format_probe(ProbeReport("w", {}, train_images=0, test_images=0, probes=[result]))
    assert f"| cls | {result.lr:g} (extended {result.extended}x) |" in table


def test_tables_mark_extended_and_edge_picks() -> None:
    assert format_lr(0.3, extended=1) == "0.3 (extended 1x)"
    assert format_lr(1.0, extended=3, lr_edge="upper") == "1 (extended 3x, upper edge)"
    assert format_lr(0.01) == "0.01"  # a result from before the marks
    dense = DenseResult("patch tokens", 1e-4, 1.0, 1.0, 2.0, lr_edge="lower", extended=0)
    table = format_dense(DenseReport("w", {}, mosaics="2x2", dense=[dense]))
    assert "| patch tokens | 0.0001 (lower edge) | 1.00 | 2.00 |" in table


def test_report_reads_probe_rows_saved_before_the_marks(tmp_path: Path) -> None:
    from ibot.report import _eval_tables
    from ibot.run_folder import RunFolder

    rows = [
        {"probe": "cls", "lr": 0.3, "val_top1": 50.0, "test_top1": 49.0, "lr_edge": None, "extended": 1},
        {"probe": "cls4", "lr": 1.0, "val_top1": 51.0, "test_top1": 50.0, "lr_edge": "upper", "extended": 3},
        {"probe": "old", "lr": 0.01, "val_top1": 51.0, "test_top1": 50.0},
    ]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "probe.json").write_text(json.dumps({"weights": "w", "probes": rows}))
    table = "\n".join(_eval_tables(RunFolder(tmp_path)))
    assert "| w | cls | 0.3 (extended 1x) |" in table and "| w | cls4 | 1 (extended 3x, upper edge) |" in table
    assert "| w | old | 0.01 |" in table


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
