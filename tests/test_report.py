"""``ibot report``: plots and tables from a run folder's metrics and saved evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ibot.errors import DataError
from ibot.report import eval_result_path, write_report


def _fake_run(run: Path) -> None:
    rows = [{"step": 0, "knn_top1": 20.0, "knn_top5": 60.0, "train_minutes": 0.0}]
    for step in range(1, 11):
        rows.append(
            {
                "step": step,
                "loss": 10.0 - step / 10,
                "loss_cls": 8.0,
                "loss_patch": 2.0 - step / 10,
                "lr": 1e-3,
                "weight_decay": 0.04,
                "teacher_momentum": 0.99,
                "teacher_temp": 0.04,
                "epoch": step / 10,
                "images_per_second": 40.0,
                "train_minutes": step / 2,
            }
        )
    rows.append({"step": 10, "knn_top1": 31.5, "knn_top5": 80.0, "train_minutes": 5.0})
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for random_init, top1 in ((False, 41.25), (True, 30.5)):
        weights = "random-init" if random_init else str(run)
        path = eval_result_path(run, "knn", random_init)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"weights": weights, "knn": {"20": {"top1": top1, "top5": 80.0}}}))
    eval_result_path(run, "probe", False).write_text(
        json.dumps(
            {
                "weights": str(run),
                "probes": [{"probe": "attention-pool", "lr": 0.01, "val_top1": 50.0, "test_top1": 52.75}],
            }
        )
    )


def test_report_has_plots_and_every_saved_result(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fake_run(run)
    md, page = write_report(run)
    text = md.read_text()
    for needle in ("41.25", "30.50", "52.75", "attention-pool", "report/losses.png", "report/knn.png"):
        assert needle in text, needle
    for png in ("losses.png", "schedules.png", "knn.png"):
        assert (run / "report" / png).stat().st_size > 1000
    assert "<table>" in page.read_text() and "52.75" in page.read_text()


def test_report_without_metrics_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="metrics.jsonl"):
        write_report(tmp_path)
