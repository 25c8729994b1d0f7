"""``ibot demo`` end to end on a tiny model, and the table / verdict it prints."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest

from ibot.cli import _pretrain_config, main, parse_args
from ibot.demo import Scores, format_demo, verdict

from conftest import make_image_folder, tiny_overrides


def _demo(tmp_path: Path, *args: str) -> Path:
    train = make_image_folder(tmp_path / "train", classes=2, per_class=6, seed=0)
    test = make_image_folder(tmp_path / "test", classes=2, per_class=3, seed=1)
    run = tmp_path / "run"
    overrides = [
        *tiny_overrides(train, run),
        f"eval.train_path={train}",
        f"eval.test_path={test}",
        "eval.knn_k=[3,20]",
        "optim.epochs=1",
    ]
    assert main(["demo", "--config", "configs/demo.yaml", "--no-progress", *args, *overrides]) == 0
    return run


def test_demo_prints_and_writes_table_report_and_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _demo(tmp_path, "--init-seeds", "3")
    out = capsys.readouterr().out
    teacher = next(line for line in out.splitlines() if line.startswith("| iBOT teacher |"))
    random_init = next(line for line in out.splitlines() if line.startswith("| random init"))
    # One pre-training seed: a single value, no spread; three init seeds: mean +/- std (a, b, c).
    assert teacher.split("|")[2].strip() == "0" and "+/-" not in teacher
    assert random_init.split("|")[2].strip() == "0, 1, 2"
    cell = random_init.split("|")[4]
    assert "+/-" in cell and cell.count(",") == 2
    assert "k=20: teacher - random init = " in out and "seed-to-seed spread (sample std of the random init" in out

    knn_md = run / "knn.md"
    assert f"k-NN table: {knn_md}" in out and teacher in knn_md.read_text()
    for name in ("report.md", "report.html"):
        assert (run / name).is_file() and str(run / name) in out
    assert "random init, same shape, mean of seeds 0, 1, 2" in (run / "report.md").read_text()
    saved = json.loads((run / "eval" / "knn-random-init.json").read_text())
    assert len(saved["knn"]["20"]["top1_per_seed"]) == 3
    picture = run / "pictures" / "attention.png"
    assert f"attention picture: {picture}" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 2000
    export = _check_own_folder_commands(out, tmp_path)
    # The printed export runs on a run of the demo's config (this one, under another name).
    assert main(["export", str(run), "--format", export.format, "--out", str(tmp_path / "exported")]) == 0


def _check_own_folder_commands(out: str, tmp_path: Path) -> argparse.Namespace:
    """The demo ends with three commands for the user's own folder, which the CLI's own parser takes:
    pre-train on DIR with the demo's config, k-NN of that run, export of that run."""
    lines = out.splitlines()
    assert lines[-4].startswith("The same on your own images")
    pretrain, knn, export = (parse_args(shlex.split(line.strip())[1:]) for line in lines[-3:])
    assert lines[-3].startswith("  ibot pretrain ")
    mine = make_image_folder(tmp_path / "mine", classes=1, per_class=2)
    pretrain.overrides = [o.replace("=DIR", f"={mine}") for o in pretrain.overrides]
    cfg = _pretrain_config(pretrain)
    assert pretrain.func.__name__ == "_cmd_pretrain" and pretrain.config == "configs/demo.yaml"
    assert cfg.data.path == str(mine) and cfg.data.auto_stats and cfg.model.arch == "vit_tiny"
    run = cfg.train.output_dir
    assert (knn.func.__name__, knn.eval_command, knn.weights) == ("_cmd_eval", "knn", run)
    assert (knn.train_dir, knn.test_dir) == ("TRAIN_DIR", "TEST_DIR")
    assert (export.func.__name__, export.run) == ("_cmd_export", run)
    assert export.out and export.out != run
    return export


def test_demo_seeds_pretrains_each_seed_and_reports_its_spread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _demo(tmp_path, "--seeds", "2", "--init-seeds", "2")
    out = capsys.readouterr().out
    assert (run / "teacher.safetensors").is_file() and (run / "seed-1" / "teacher.safetensors").is_file()
    teacher = next(line for line in out.splitlines() if line.startswith("| iBOT teacher |"))
    assert teacher.split("|")[2].strip() == "0, 1" and "+/-" in teacher
    assert main(["demo", "--seeds", "0", "--no-progress"]) == 2


def test_demo_runs_again_in_its_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second ``ibot demo`` replaces the first one's run instead of refusing its checkpoints."""
    _demo(tmp_path)
    first = capsys.readouterr().out
    run = _demo(tmp_path)
    assert capsys.readouterr().out.split("time:")[0] == first.split("time:")[0]  # deterministic: same table
    assert len(list(run.glob("checkpoint-*.pt"))) == 1  # the first run's are gone, not kept beside


def test_verdict_compares_the_gain_with_the_largest_spread() -> None:
    teacher = Scores("t", (0, 1, 2), {20: [40.0, 41.0, 42.0]})  # std 1.0
    flat = Scores("r", (0, 1, 2), {20: [30.0, 30.5, 31.0]})  # std 0.5
    assert "+10.50 points, 10.5x the seed-to-seed spread (sample std of the teacher: 1.00): more than" in verdict(
        teacher, flat, 20
    )
    noisy = Scores("r", (0, 1, 2), {20: [35.0, 40.0, 45.0]})  # std 5.0, gain 1.0
    assert "(sample std of the random init: 5.00): NOT more than" in verdict(teacher, noisy, 20)
    single = Scores("t", (0,), {20: [33.0]})
    assert "one seed each" in verdict(single, Scores("r", (0,), {20: [30.0]}), 20)
    table = format_demo(single, flat, (20,))
    assert "| t | 0 | 33.00 (33.00) |" in table and "| r | 0, 1, 2 | 30.50 +/- 0.50 (30.00, 30.50, 31.00) |" in table
    assert table.splitlines()[-1] == "| teacher - random init (means) | | +2.50 |"
