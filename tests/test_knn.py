from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ibot.errors import DataError
from ibot.eval.knn import knn_classify


def test_separable_clusters_give_100_percent() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 10
    train_labels = torch.arange(5).repeat_interleave(40)
    test_labels = torch.arange(5).repeat_interleave(10)
    train = centers[train_labels] + torch.randn(200, 16, generator=g) * 0.1
    test = centers[test_labels] + torch.randn(50, 16, generator=g) * 0.1
    results = knn_classify(train, train_labels, test, test_labels, ks=(1, 20, 200), chunk_size=7)
    for k in (1, 20):
        assert results[k] == (100.0, 100.0)
    assert results[200][1] == 100.0  # 200 neighbours span every class; weighting keeps top-5 right


def test_weighted_votes_and_top5() -> None:
    # One query; its 3 neighbours: very close class 1, two farther class 0.
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 2])
    query = torch.tensor([[1.0, 0.01]])
    res = knn_classify(train, labels, query, torch.tensor([1]), ks=(3,), temperature=0.07)
    assert res[3][0] == 100.0  # exp(1/0.07) outweighs 2 * exp(0.6/0.07)
    res_flat = knn_classify(train, labels, query, torch.tensor([1]), ks=(3,), temperature=100.0)
    assert res_flat[3][0] == 0.0  # nearly uniform weights: the majority (class 0) wins
    assert res_flat[3][1] == 100.0  # but class 1 is in the top-5


def test_unlabelled_data_is_rejected() -> None:
    with pytest.raises(DataError, match="labelled"):
        knn_classify(torch.randn(3, 2), torch.tensor([-1, 0, 1]), torch.randn(1, 2), torch.tensor([0]))


def test_extract_and_knn_on_a_trained_run(tiny_config, image_folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ibot.eval.commands import EvalRequest, run_knn
    from ibot.train.loop import train

    from conftest import make_image_folder

    train(tiny_config, progress=False)
    # Held-out test images: the same two class colours under other noise, so no test image
    # finds itself among the training ones. The colours are far apart: the pipeline (features
    # in folder order, labels beside them, k-NN) must classify them; chance is 50 %, and a
    # feature/label misalignment or a collapsed backbone lands there.
    held_out = make_image_folder(tmp_path / "held_out", noise_seed=1)
    out = run_knn(EvalRequest(tiny_config.train.output_dir, str(image_folder), str(held_out), progress=False))
    assert out.train_images == out.test_images == 16
    assert out.weights != "random-init"
    for k in tiny_config.eval.knn_k:
        assert out.knn[k].top1 >= 90.0, (k, out.knn[k])
    baseline = run_knn(
        EvalRequest(tiny_config.train.output_dir, str(image_folder), str(held_out), random_init=True, progress=False)
    )
    assert baseline.weights == "random-init"
