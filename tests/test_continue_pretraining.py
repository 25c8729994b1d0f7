"""benchmarks/continue_pretraining.py: its variants, its table, and what it reads instead of rerunning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark

bench = load_benchmark("continue_pretraining")


def _args(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return bench.parse_args(
        ["--backbone", str(tmp_path / "b"), "--train", "tr", "--test", "te", "--out", str(tmp_path / "out"), *extra]
    )


def test_variants_turn_steps_into_the_plans_epochs(tmp_path: Path) -> None:
    args = _args(tmp_path, "--steps", "40", "--freeze-steps", "30", "--lr-scale", "0.2", "data.batch_size=8")
    over = bench.run_overrides("both", 3, args, Path("bb.safetensors"), per_epoch=78)
    values = dict(o.split("=", 1) for o in over)
    assert round(float(values["optim.freeze_backbone_epochs"]) * 78) == 30  # as Schedules rounds epochs
    assert -(-float(values["optim.epochs"]) * 78 // 1) == 40  # RunPlan: ceil(epochs * steps per epoch)
    assert values["optim.backbone_lr_scale"] == "0.2" and values["train.seed"] == "3"
    assert values["eval.monitor_every_steps"] == "50" and values["eval.monitor_every_minutes"] == "0"
    assert over[-1] == "data.batch_size=8"  # the caller's overrides last: they win
    fresh = dict(o.split("=", 1) for o in bench.run_overrides("fresh", 0, args, Path("b"), 78))
    assert fresh["optim.freeze_backbone_epochs"] == "0" and fresh["optim.backbone_lr_scale"] == "1.0"


def test_table_of_mean_std_drop_and_end() -> None:
    curves = {
        "fresh": [{0: 50.0, 5: 20.0, 10: 40.0}, {0: 50.0, 5: 30.0, 10: 44.0}],
        "freeze": [{0: 50.0, 5: 51.0, 10: 53.0}, {0: 50.0, 5: 49.0, 10: 55.0}],
    }
    lines = bench.table(curves).splitlines()
    assert lines[0] == "| variant | seeds | step 0 | step 5 | step 10 | min after 0 − step 0 | end − step 0 |"
    assert lines[2] == "| fresh | 2 | 50.00 ± 0.00 | 25.00 ± 7.07 | 42.00 ± 2.83 | -25.00 ± 7.07 | -8.00 ± 2.83 |"
    assert lines[3] == "| freeze | 2 | 50.00 ± 0.00 | 50.00 ± 1.41 | 54.00 ± 1.41 | 0.00 ± 1.41 | 4.00 ± 1.41 |"


def _finished(run: Path, settings: dict, steps: int) -> None:
    run.mkdir(parents=True)
    (run / bench.SETTINGS).write_text(json.dumps(settings))
    rows = [{"step": 0, "knn_top1": 30.0}, {"step": steps, "loss": 1.0}, {"step": steps, "knn_top1": 33.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_finished_run_is_read_and_one_of_other_settings_refused(tmp_path: Path) -> None:
    run = tmp_path / "fresh" / "seed0"
    _finished(run, {"config": "c.yaml", "overrides": ["a=1"]}, steps=8)
    # No subprocess: a finished run is read (an attempt to train would fail without data).
    assert bench.run_one(run, "c.yaml", ["a=1"], 8, dry_run=False) == {0: 30.0, 8: 33.5}
    with pytest.raises(SystemExit, match="was run with other settings"):
        bench.run_one(run, "c.yaml", ["a=2"], 8, dry_run=False)


def test_an_unfinished_run_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "fresh" / "seed0"
    _finished(run, {"config": "c.yaml", "overrides": []}, steps=8)
    with pytest.raises(SystemExit, match="unfinished run without a checkpoint; remove the folder"):
        bench.run_one(run, "c.yaml", [], 16, dry_run=False)


def test_the_backbone_is_copied_once_and_a_changed_source_refused(tmp_path: Path) -> None:
    source = tmp_path / "teacher.safetensors"
    source.write_bytes(b"weights 1")
    copy = bench.snapshot_backbone(source, tmp_path / "out")
    assert copy.read_bytes() == b"weights 1"
    assert bench.snapshot_backbone(source, tmp_path / "out") == copy
    source.write_bytes(b"weights 2")  # a source run that saved again
    with pytest.raises(SystemExit, match="is not the backbone the runs in"):
        bench.snapshot_backbone(source, tmp_path / "out")
    assert copy.read_bytes() == b"weights 1"


def test_the_heads_control_reads_the_run_folders_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "source"
    run.mkdir()
    (run / "teacher.safetensors").write_bytes(b"backbone")
    with pytest.raises(SystemExit, match="no checkpoint.pt there"):
        bench.backbone_file(run, heads=True)
    (run / "checkpoint.pt").write_bytes(b"checkpoint")
    assert bench.backbone_file(run).name == "teacher.safetensors"
    assert bench.backbone_file(run, heads=True).name == "checkpoint.pt"
    with pytest.raises(SystemExit, match="'heads' variant needs a run folder"):
        bench.backbone_file(run / "teacher.safetensors", heads=True)
    # Its own copy beside the backbone's, and otherwise the fresh variant's settings.
    copy = bench.snapshot_backbone(bench.backbone_file(run, heads=True), tmp_path / "out", bench.HEADS_COPY)
    assert copy.name == bench.HEADS_COPY and copy.read_bytes() == b"checkpoint"
    args = _args(tmp_path)
    heads = dict(o.split("=", 1) for o in bench.run_overrides("heads", 0, args, copy, 78))
    fresh = dict(o.split("=", 1) for o in bench.run_overrides("fresh", 0, args, Path("b"), 78))
    assert heads.pop("model.init_from") == str(copy) and fresh.pop("model.init_from") == "b"
    assert heads == fresh
