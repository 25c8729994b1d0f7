"""The command line: one-line errors for bad input, and the main commands."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ibot.cli import build_parser, main, parse_args
from ibot.config import Config
from ibot.models.vit import MaskedViT
from ibot.storage import TEACHER_NAME, save_backbone

from conftest import tiny_overrides


def test_unknown_key_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lrr: 1\n")
    assert main(["pretrain", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "c.yaml" in err and "optim.lrr" in err and "optim.lr" in err


def test_missing_data_path_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {tmp_path / 'nowhere'}\n")
    assert main(["pretrain", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err and "does not exist" in err


def test_pretrain_then_knn_through_the_console_script(image_folder: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    run = tmp_path / "run"
    args = ["pretrain", "--config", str(cfg), "--no-progress", *tiny_overrides(image_folder, run), "train.max_steps=2"]
    done = subprocess.run([sys.executable, "-m", "ibot", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (run / "teacher.safetensors").is_file()
    knn = subprocess.run(
        [
            sys.executable,
            "-m",
            "ibot",
            "eval",
            "knn",
            str(run),
            "--train-dir",
            str(image_folder),
            "--test-dir",
            str(image_folder),
            "--no-progress",
            "--json",
            str(tmp_path / "knn.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert knn.returncode == 0, knn.stderr
    assert "k=20 top-1" in knn.stdout and (tmp_path / "knn.json").is_file()
    # In-process (the subprocess start costs seconds): probes reuse the cached features.
    from ibot.cli import main

    probe_args = ["eval", "probe", str(run), "--train-dir", str(image_folder), "--test-dir", str(image_folder)]
    probe_args += ["--no-progress", "--json", str(tmp_path / "probe.json")]
    probe_args += ["eval.probe_epochs=1", "eval.probe_batch_size=4"]
    assert main(probe_args) == 0
    result = json.loads((tmp_path / "probe.json").read_text())
    names = ["cls", "cls4", "cls+avg", "cls4+avg", "mean-pool", "attention-pool", "attentive"]
    assert [r["probe"] for r in result["probes"]] == names
    # One folder as train and test: one entry for knn's last [cls], one for the probes' tokens.
    assert len(list((run / "features").glob("*.safetensors"))) == 2
    assert main([*probe_args, "eval.probes=[bogus]"]) == 2
    dense_args = ["eval", "dense", str(run), "--train-dir", str(image_folder), "--test-dir", str(image_folder)]
    dense_args += ["--no-progress", "--json", str(tmp_path / "dense.json"), "eval.probe_epochs=1"]
    dense_args += ["eval.dense_train_mosaics=8", "eval.dense_test_mosaics=4", "eval.probe_batch_size=4"]
    assert main(dense_args) == 0
    dense = json.loads((tmp_path / "dense.json").read_text())["dense"]
    assert [r["features"] for r in dense] == ["patch tokens", "[cls] broadcast"]
    assert (run / "eval" / "attention_pool.png").is_file() and (run / "eval" / "knn.json").is_file()
    robust_args = ["eval", "robustness", str(run), "--train-dir", str(image_folder), "--test-dir", str(image_folder)]
    robust_args += ["--no-progress", "eval.probe_epochs=1", "eval.probe_batch_size=4", "eval.robustness_images=4"]
    assert main(robust_args) == 0
    robust = json.loads((run / "eval" / "robustness.json").read_text())
    assert len(robust["per_corruption"]) == 15 and robust["images"] == 4
    assert all(len(v) == 5 for v in robust["per_severity"].values())
    finetune_args = ["eval", "finetune", str(run), "--train-dir", str(image_folder), "--test-dir", str(image_folder)]
    finetune_args += ["--no-progress", "finetune.epochs=1", "finetune.batch_size=4", "finetune.num_workers=0"]
    assert main(finetune_args) == 0
    assert json.loads((run / "eval" / "finetune.json").read_text())["steps"] == 4
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "mean-pool" in report and "patch tokens" in report and "eval/attention_pool.png" in report
    assert "Fine-tuning" in report and "Robustness" in report


def test_knn_on_missing_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "knn", str(tmp_path / "none.safetensors"), "--train-dir", "x", "--test-dir", "y"]) == 2
    assert "none.safetensors" in capsys.readouterr().err


def test_overrides_may_follow_options() -> None:
    args = parse_args(["eval", "knn", "w.safetensors", "--no-progress", "eval.knn_k=[5]", "--train-dir", "t"])
    assert args.overrides == ["eval.knn_k=[5]"] and args.train_dir == "t" and args.no_progress
    args = parse_args(["pretrain", "optim.lr=1", "--config", "c.yaml", "optim.epochs=2"])
    assert args.overrides == ["optim.lr=1", "optim.epochs=2"]
    with pytest.raises(SystemExit):
        parse_args(["pretrain", "--config", "x.yaml", "--bogus-flag"])


@pytest.mark.parametrize("text, minutes", [("90s", 1.5), ("45m", 45.0), ("1.5h", 90.0), ("20", 20.0)])
def test_budget_durations(text: str, minutes: float) -> None:
    assert parse_args(["pretrain", "--config", "c.yaml", "--budget", text]).budget == pytest.approx(minutes)


@pytest.mark.parametrize("text", ["abc", "0m", "-5m", "m"])
def test_bad_budget_is_refused(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["pretrain", "--config", "c.yaml", "--budget", text])
    assert "--budget" in capsys.readouterr().err


def test_eval_subcommands_are_the_registry_and_their_help_renders() -> None:
    import argparse

    from ibot.eval.commands import COMMANDS

    parser = build_parser()
    eval_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    (sub,) = [a for a in eval_parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(sub.choices) == list(COMMANDS)
    for name, command_parser in sub.choices.items():
        assert f"ibot eval {name}" in command_parser.format_help()
    # the sub-commands' help lines, a literal % among them (argparse formats help with %)
    assert "1 %/10 %" in " ".join(eval_parser.format_help().split())


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every parser below it (``ibot eval knn`` ...)."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _subparsers(child)
    return found


def test_every_help_renders(capsys: pytest.CaptureFixture[str]) -> None:
    parsers = _subparsers(build_parser())
    assert {p.prog for p in parsers} >= {"ibot eval lowshot", "ibot visualize", "ibot embed"}
    for parser in parsers:
        assert parser.format_help().startswith("usage: ")  # argparse %-formats each help string
    with pytest.raises(SystemExit) as done:
        main(["eval", "--help"])  # lists each command's help string
    assert done.value.code == 0 and "1 %/10 % of the labels" in " ".join(capsys.readouterr().out.split())


def test_an_override_error_names_the_override_not_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("optim:\n  lr: 1.0e-3\n")
    assert main(["pretrain", "--config", str(cfg), "data.batch_sise=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibot: error: override data.batch_sise=4: unknown config key data.batch_sise")
    assert "demo.yaml" not in err and "\n" not in err


def test_a_binary_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)) * 16)
    assert main(["pretrain", "--config", str(binary)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ibot: error: {binary}: not a YAML text file (not UTF-8 text)"


@pytest.mark.parametrize(
    "option, value", [("--count", "-2"), ("--count", "0"), ("--clusters", "0"), ("--pairs", "0"), ("--count", "x")]
)
def test_visualize_counts_must_be_positive(option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        parse_args(["visualize", "clusters", "run", option, value])
    err = capsys.readouterr().err
    assert done.value.code == 2 and f"argument {option}: " in err and "Traceback" not in err


@pytest.fixture
def tiny_run_with_eval_paths(tiny_config: Config, tmp_path: Path) -> Path:
    """A run folder (untrained tiny backbone) whose config names eval folders that are gone."""
    gone = tmp_path / "gone"
    paths = replace(tiny_config.eval, train_path=str(gone / "train"), test_path=str(gone / "test"))
    cfg = replace(tiny_config, eval=paths)
    run = tmp_path / "run"
    save_backbone(run / TEACHER_NAME, MaskedViT.from_config(cfg.model, 16).state_dict(), cfg.to_dict())
    return run


def test_a_missing_default_folder_names_its_config_key(
    tiny_run_with_eval_paths: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tiny_run_with_eval_paths
    assert main(["eval", "knn", str(run), "--test-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    missing = tmp_path / "gone" / "train"
    assert err == f"ibot: error: eval.train_path={missing} (the run's config): path does not exist; give --train-dir"
    assert main(["eval", "knn", str(run), "--train-dir", str(tmp_path), f"eval.test_path={missing}"]) == 2
    assert f"eval.test_path={missing} (an override): path does not exist" in capsys.readouterr().err
    assert main(["visualize", "pca", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ibot: error: eval.test_path={tmp_path / 'gone' / 'test'} (the run's config)")
