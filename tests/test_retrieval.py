"""Retrieval: mAP@R vs a brute-force reference, flat and IVF indexes, ``ibot retrieve``, ``ibot eval retrieval``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ibot.cli import main
from ibot.config import Config
from ibot.errors import IBOTError
from ibot.eval.retrieval import (
    IndexSettings,
    average_precision_at_r,
    build_index,
    describe_index,
    normalize,
    retrieval_metrics,
    search,
)
from ibot.models.vit import MaskedViT
from ibot.storage import TEACHER_NAME, save_backbone

from conftest import make_image_folder


def brute_force(database: np.ndarray, db_labels: np.ndarray, queries: np.ndarray, q_labels: np.ndarray) -> dict:
    """mAP@R and recall@1/5 by definition: every query ranks the whole database, one loop per query."""
    aps, r1, r5 = [], [], []
    for q, label in zip(queries, q_labels):
        order = np.argsort(-(database @ q), kind="stable")
        relevant = db_labels[order] == label
        r = int((db_labels == label).sum())
        precision_sum = sum(relevant[: i + 1].sum() / (i + 1) for i in range(r) if relevant[i])
        aps.append(precision_sum / r)
        r1.append(relevant[:1].any())
        r5.append(relevant[:5].any())
    return {"map_at_r": 100 * np.mean(aps), "recall_at_1": 100 * np.mean(r1), "recall_at_5": 100 * np.mean(r5)}


def planted(n_classes: int, per_class: int, noise: float, seed: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around ``n_classes`` random centres; ``noise`` decides how much the classes mix."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    return normalize(centres[labels] + noise * rng.normal(size=(labels.size, dim))), labels


def test_average_precision_at_r_by_hand() -> None:
    hits = np.array([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=bool)
    r = np.array([2, 3, 2])
    # (1/2)(1/1) -- rank 3 is beyond R; (1/3)(1/2 + 2/3); (1/2)(1/1 + 2/2)
    np.testing.assert_allclose(average_precision_at_r(hits, r), [0.5, (1 / 2 + 2 / 3) / 3, 1.0])


def test_map_at_r_matches_brute_force_on_mixed_classes() -> None:
    database, db_labels = planted(4, 30, noise=1.2, seed=0)  # classes overlap: mAP@R well below 100
    keep = np.ones(len(db_labels), dtype=bool)
    keep[:20] = keep[30:40] = False  # R = 10, 20, 30, 30: a chunk's search goes deeper than some R
    database, db_labels = database[keep], db_labels[keep]
    queries, q_labels = planted(4, 10, noise=1.2, seed=1)
    scores, index = retrieval_metrics(database, db_labels, queries, q_labels, chunk=7)
    reference = brute_force(database, db_labels, queries, q_labels)
    assert index == "flat (exact)"
    assert 20 < reference["map_at_r"] < 90
    assert scores.map_at_r == pytest.approx(reference["map_at_r"], abs=1e-6)
    assert scores.recall[1] == pytest.approx(reference["recall_at_1"])
    assert scores.recall[5] == pytest.approx(reference["recall_at_5"])
    assert scores.queries == 40 and scores.queries_without_match == 0


def test_a_query_whose_class_is_not_in_the_database_is_left_out() -> None:
    database, db_labels = planted(2, 10, noise=0.1, seed=0)
    queries, q_labels = planted(3, 2, noise=0.1, seed=1)
    scores, _ = retrieval_metrics(database, db_labels, queries, q_labels)
    assert scores.queries == 4 and scores.queries_without_match == 2
    assert scores.map_at_r == 100.0


@pytest.mark.parametrize("flat_max, kind", [(10_000, "flat"), (0, "ivf")])
def test_flat_and_ivf_find_planted_neighbours(flat_max: int, kind: str) -> None:
    database, labels = planted(8, 300, noise=0.3, seed=0, dim=32)  # 2400 vectors, well-separated classes
    index = build_index(database, IndexSettings(flat_max=flat_max, nprobe=8))
    assert describe_index(index).startswith(kind)
    if kind == "ivf":
        assert index.nlist == round(4 * np.sqrt(2400)) and index.nprobe == 8
    # A slightly moved copy of a database vector finds that vector first.
    picks = np.arange(0, 2400, 97)
    moved = normalize(database[picks] + 0.01 * np.random.default_rng(2).normal(size=(picks.size, 32)))
    scores, ids = search(index, moved, 5)
    assert (ids[:, 0] == picks).all() and (scores[:, 0] > 0.99).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    queries, q_labels = planted(8, 20, noise=0.3, seed=1, dim=32)
    metrics, described = retrieval_metrics(database, labels, queries, q_labels, IndexSettings(flat_max, nprobe=8))
    assert described.startswith(kind) and metrics.recall[1] == 100.0
    if kind == "flat":
        assert metrics.map_at_r > 99.0
    else:
        # 8 of 196 cells hold about 100 vectors, fewer than R = 300: mAP@R counts the rest as misses.
        assert metrics.map_at_r < 60.0
        everywhere, _ = retrieval_metrics(database, labels, queries, q_labels, IndexSettings(0, nprobe=index.nlist))
        assert everywhere.map_at_r > 99.0  # visiting every cell is exact search again


def test_a_missing_faiss_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(IBOTError, match=r"pip install 'ibot\[retrieval\]'"):
        build_index(np.eye(3, dtype=np.float32))


@pytest.fixture
def tiny_run(tiny_config: Config, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_backbone(run / TEACHER_NAME, MaskedViT.from_config(tiny_config.model, 16).state_dict(), tiny_config.to_dict())
    return run


def test_retrieve_prints_top_k_and_writes_a_contact_sheet(
    tiny_run: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (image_folder / "class_1" / "broken.png").write_bytes(b"\x89PNG nothing more")
    queries = make_image_folder(tmp_path / "queries", classes=2, per_class=1, noise_seed=3)
    query_file = str(queries / "class_0" / "000.png")
    out = tmp_path / "sheet"
    argv = ["retrieve", str(tiny_run), "--index", str(image_folder), "--k", "3", "--out", str(out), "--no-progress"]
    assert main([*argv, "--query", query_file, str(queries / "class_1"), "data.num_workers=0"]) == 0
    printed = capsys.readouterr().out
    assert query_file in printed and printed.count("  1. ") == 2 and printed.count("  3. ") == 2
    result = json.loads((out / "retrieval.json").read_text())
    assert [len(q["results"]) for q in result["queries"]] == [3, 3]
    assert result["index_images"] == 16  # broken.png left out
    assert all(r["path"].startswith("class_") for q in result["queries"] for r in q["results"])
    page = (out / "retrieval.html").read_text()
    assert page.count('<tr class="query">') == 2
    assert page.count("data:image/jpeg;base64,") == 2 * (1 + 3)  # each query and its 3 results, embedded
    assert "query: 000.png" in page and result["queries"][0]["results"][0]["path"] in page
    assert "broken.png" in (out / "skipped.tsv").read_text()
    assert len(list((tiny_run / "features").glob("*.safetensors"))) == 1  # the index folder's cached features
    # The IVF path through the command line: same top-1 for a query whose class is planted.
    assert main([*argv, "--query", query_file, "data.num_workers=0", "eval.retrieval_flat_max=0"]) == 0
    ivf = json.loads((out / "retrieval.json").read_text())
    assert ivf["index"].startswith("ivf") and ivf["queries"][0]["results"][0] == result["queries"][0]["results"][0]


def test_eval_retrieval_cli_keeps_its_result(tiny_run: Path, image_folder: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    held_out = make_image_folder(tmp_path / "held_out", noise_seed=1)
    argv = ["eval", "retrieval", str(tiny_run), "--train-dir", str(image_folder), "--test-dir", str(held_out)]
    assert main([*argv, "--no-progress", "data.num_workers=0"]) == 0
    assert "| weights | index | mAP@R | recall@1 | recall@5 |" in capsys.readouterr().out
    result = json.loads((tiny_run / "eval" / "retrieval.json").read_text())
    assert result["train_images"] == result["test_images"] == result["queries"] == 16
    assert result["index"] == "flat (exact)"
    # Two far-apart class colours: even untrained weights keep them apart (R = 8 per class).
    assert result["map_at_r"] > 90 and result["recall_at_1"] == 100.0
    assert main([*argv, "--random-init", "--no-progress", "eval.retrieval_flat_max=0"]) == 0
    baseline = json.loads((tiny_run / "eval" / "retrieval-random-init.json").read_text())
    assert baseline["weights"] == "random-init" and baseline["index"].startswith("ivf")
