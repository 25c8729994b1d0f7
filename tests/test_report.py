"""``ibot report``: plots and tables from a run folder's metrics and saved evaluations."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ibot.errors import DataError
from ibot.report import write_report
from ibot.run_folder import RunFolder
from ibot.train.metrics import MetricsLogger, read_metrics


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
                "data_wait_share": 0.375,
                "train_minutes": step / 2,
            }
        )
    rows.append({"step": 10, "knn_top1": 31.5, "knn_top5": 80.0, "train_minutes": 5.0})
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for random_init, top1 in ((False, 41.25), (True, 30.5)):
        weights = "random-init" if random_init else str(run)
        path = RunFolder(run).eval_result("knn", random_init)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"weights": weights, "knn": {"20": {"top1": top1, "top5": 80.0}}}))
    RunFolder(run).eval_result("retrieval", True).write_text(
        json.dumps(
            {
                "weights": "random-init",
                "index": "flat (exact)",
                "map_at_r": 2.5,
                "recall_at_1": 26.125,
                "recall_at_5": 64.5,
            }
        )
    )
    RunFolder(run).eval_result("probe", False).write_text(
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
    needles = ("41.25", "30.50", "52.75", "attention-pool", "report/losses.png", "report/knn.png", "| 38 % |", "26.12")
    for needle in needles:
        assert needle in text, needle
    for png in ("losses.png", "schedules.png", "knn.png"):
        assert (run / "report" / png).stat().st_size > 1000
    assert "<table>" in page.read_text() and "52.75" in page.read_text()


def test_report_without_metrics_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="metrics.jsonl"):
        write_report(tmp_path)


def test_report_of_a_killed_run_skips_its_partial_last_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _fake_run(run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "loss": 8.')  # the write a kill cut short: no closing brace, no newline
    with caplog.at_level(logging.WARNING, logger="ibot.train.metrics"):
        md, _ = write_report(run)
    assert "41.25" in md.read_text()
    assert "partial last line" in caplog.text and "line 13" in caplog.text
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")][-2:] == [10, 10]  # rows before it kept


def test_damage_before_the_last_line_is_one_line_naming_file_and_line(tmp_path: Path) -> None:
    # Not what a kill leaves: refused rather than reported with rows silently missing.
    path = tmp_path / "metrics.jsonl"
    for bad in ('{"step": 2, "loss"', "[1, 2]"):  # cut short, and JSON but no row
        path.write_text(f'{{"step": 1}}\n{bad}\n{{"step": 3}}\n')
        with pytest.raises(DataError, match=r"metrics\.jsonl line 2: ") as info:
            read_metrics(path)
        assert "\n" not in str(info.value)
    path.write_text('{"step": 1}\n\n{"step": 2}\n')  # blank lines are not damage
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]


def test_logger_of_a_resumed_run_starts_on_a_new_line(tmp_path: Path) -> None:
    # A kill left a fragment; the resumed run's rows must not be glued onto it.
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(2, {"loss": 1.5})
    logger.close()
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path.write_text('{"step": 1}')  # a whole row that only lost its newline is kept
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(2, {})
    logger.close()
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
