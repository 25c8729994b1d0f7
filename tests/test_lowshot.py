"""``ibot eval lowshot``: seeded class-balanced and stratified draws, mean/std over draws, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibot.errors import DataError
from ibot.eval.lowshot import (
    LowshotProtocol,
    Setting,
    Split,
    draw_fraction,
    draw_per_class,
    evaluate_lowshot,
    knn_top1,
    mean_std,
)

LABELS = torch.tensor([0] * 100 + [1] * 50 + [2] * 30)[torch.randperm(180, generator=torch.Generator().manual_seed(0))]


def test_per_class_draws_take_exactly_n_of_every_class() -> None:
    idx = draw_per_class(LABELS, 5, seed=0)
    assert len(idx) == len(set(idx.tolist())) == 15
    assert torch.bincount(LABELS[idx]).tolist() == [5, 5, 5]
    assert torch.equal(idx, draw_per_class(LABELS, 5, seed=0))
    assert not torch.equal(idx, draw_per_class(LABELS, 5, seed=1))


def test_fraction_draws_are_stratified_and_seeded() -> None:
    idx = draw_fraction(LABELS, 0.1, seed=0)
    assert torch.bincount(LABELS[idx]).tolist() == [10, 5, 3]
    assert torch.equal(idx, draw_fraction(LABELS, 0.1, seed=0))
    assert not torch.equal(idx, draw_fraction(LABELS, 0.1, seed=1))
    assert torch.bincount(LABELS[draw_fraction(LABELS, 0.01, seed=0)]).tolist() == [1, 1, 1]  # at least one


def test_too_few_images_of_a_class_is_one_line() -> None:
    with pytest.raises(DataError, match="class 2 has only 30"):
        draw_per_class(LABELS, 40, seed=0)


def test_too_few_images_names_the_class_folder() -> None:
    with pytest.raises(DataError, match="class ship has only 30"):
        draw_per_class(LABELS, 40, seed=0, classes=("cat", "dog", "ship"))


def test_mean_and_sample_std_over_draws() -> None:
    out = mean_std([1.0, 2.0, 3.0, 4.0])
    assert out["mean"] == 2.5 and out["std"] == pytest.approx((5 / 3) ** 0.5) and out["runs"] == [1, 2, 3, 4]
    assert mean_std([7.0])["std"] == 0.0


def noisy_data(noise: float, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 8, generator=g)
    train_y = torch.arange(3).repeat_interleave(40)
    test_y = torch.arange(3).repeat_interleave(20)
    train_x = centers[train_y] + noise * torch.randn(120, 8, generator=g)
    test_x = centers[test_y] + noise * torch.randn(60, 8, generator=g)
    return Split(train_x, train_y, test_x, test_y)


def protocol(*settings: Setting, seeds=(0, 1, 2)) -> LowshotProtocol:  # type: ignore[no-untyped-def]
    return LowshotProtocol(settings, tuple(seeds), knn_k=20, knn_temperature=0.07, logreg_c=1.0)


def test_separable_classes_are_learnt_from_one_label_each() -> None:
    (one,) = evaluate_lowshot(noisy_data(0.05), protocol(Setting(shots=1)))
    assert one.setting == "1 per class" and one.labelled == 3  # k=20 capped at 3 neighbours
    for spread in (one.knn, one.logreg):
        assert spread.runs == [100.0] * 3 and spread.std == 0.0


def test_results_are_the_mean_over_the_seeded_draws() -> None:
    data = noisy_data(1.5)
    (ten,) = evaluate_lowshot(data, protocol(Setting(fraction=0.1), seeds=(4, 5, 6)))
    assert ten.setting == "10 %" and ten.labelled == 12
    expected = [knn_top1(data.labelled(draw_fraction(data.train_y, 0.1, s)), 20, 0.07) for s in (4, 5, 6)]
    assert ten.knn.runs == expected and len(set(expected)) > 1  # the draws differ
    assert ten.knn.mean == pytest.approx(np.mean(expected))
    assert ten.knn.std == pytest.approx(np.std(expected, ddof=1))
    assert 33.0 < ten.logreg.mean < 100.0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A pico run trained on two class colours (seconds), shared by this module's CLI tests."""
    from ibot.config import load_config
    from ibot.train.loop import train

    from conftest import make_image_folder, tiny_overrides

    root = tmp_path_factory.mktemp("lowshot")
    images = make_image_folder(root / "images")
    cfg = load_config(None, tiny_overrides(images, root / "run"))
    train(cfg, progress=False)
    return cfg.train.output_dir, images


def test_cli_lowshot_on_a_tiny_run(tiny_run, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from ibot.cli import main

    from conftest import make_image_folder

    run, image_folder = tiny_run
    held_out = make_image_folder(tmp_path / "held_out", noise_seed=1)
    args = ["eval", "lowshot", run, "--train-dir", str(image_folder), "--test-dir", str(held_out), "--no-progress"]
    args += ["eval.lowshot_shots=[1,2]", "eval.lowshot_fractions=[0.5]", "eval.lowshot_draws=[0,1]"]
    cache = Path(run) / "features"
    before = set(cache.glob("*.safetensors"))
    assert main([*args, "--json", str(tmp_path / "lowshot.json")]) == 0
    assert "logistic regression top-1" in capsys.readouterr().out
    result = json.loads((tmp_path / "lowshot.json").read_text())
    assert [s["setting"] for s in result["lowshot"]] == ["1 per class", "2 per class", "50 %"]
    assert [s["labelled"] for s in result["lowshot"]] == [2, 4, 8]
    assert all(len(s["knn"]["runs"]) == 2 for s in result["lowshot"])
    assert result["lowshot"][-1]["knn"]["mean"] >= 90.0  # two far-apart colours, 4 labels each
    added = set(cache.glob("*.safetensors")) - before
    assert len(added) == 2  # one entry per folder
    assert main(["eval", "cluster", run, "--train-dir", str(image_folder), "--test-dir", str(held_out)]) == 0
    assert set(cache.glob("*.safetensors")) == before | added  # cluster reuses the test folder's entry
    assert main(["report", run]) == 0
    report = (Path(run) / "report.md").read_text()
    assert "Low-shot" in report and "50 %" in report and "Unsupervised classification" in report


def test_a_folder_without_classes_is_one_line(tiny_run, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from ibot.cli import main

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(flat / f"{i}.png")
    for command in ("lowshot", "cluster"):
        args = ["eval", command, tiny_run[0], "--train-dir", str(flat), "--test-dir", str(flat)]
        assert main([*args, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(flat) in err and "one sub-folder per class" in err, err


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.lowshot_fractions=[1.5]", "eval.lowshot_fractions"),
        ("eval.lowshot_shots=[0]", "eval.lowshot_shots"),
        ("eval.lowshot_draws=[1,1]", "eval.lowshot_draws"),
        ("eval.lowshot_draws=[]", "eval.lowshot_draws"),
        ("eval.lowshot_logreg_c=0", "eval.lowshot_logreg_c"),
        ("eval.cluster_restarts=0", "eval.cluster_restarts"),
    ],
)
def test_bad_settings_are_one_line_config_errors(override: str, key: str) -> None:
    from ibot.config import load_config
    from ibot.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(None, [override])
