"""A resume says what changed: other data, batch size, world size or image count is refused in one line
(the first two, and the image count, unless ``train.resume_allow_changes`` allows them); a finished run
is reported as finished, not trained on."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from ibot.cli import main
from ibot.config import load_config
from ibot.errors import ConfigError
from ibot.storage import CHECKPOINT_NAME, load_checkpoint
from ibot.train.checkpoint import save_checkpoint
from ibot.train.loop import train
from ibot.train.metrics import read_metrics

from conftest import make_image_folder, tiny_overrides


def _first_part(image_folder: Path, run: Path, *extra: str) -> list[str]:
    """Train the first step of a run; its overrides."""
    overrides = tiny_overrides(image_folder, run) + list(extra)
    train(load_config(None, overrides + ["train.max_steps=1"]), progress=False)
    return overrides


def _edit_plan(run: Path, **plan: object) -> None:
    """Rewrite the plan in the step checkpoint that checkpoint.pt links (``None`` drops a field)."""
    path = (run / CHECKPOINT_NAME).resolve()
    state = load_checkpoint(path)
    state["plan"] = {k: v for k, v in {**state["plan"], **plan}.items() if v is not None}
    save_checkpoint(path, state)


@pytest.mark.parametrize("key", ["data.path", "data.batch_size"])
def test_other_data_or_batch_size_is_refused_naming_the_key_unless_allowed(
    image_folder: Path, tmp_path: Path, key: str
) -> None:
    run = tmp_path / "run"
    overrides = _first_part(image_folder, run)
    copy = shutil.copytree(image_folder, tmp_path / "copy")  # the same images elsewhere
    before, after = (str(image_folder), str(copy)) if key == "data.path" else ("4", "2")
    changed = overrides + [f"{key}={after}"]
    with pytest.raises(ConfigError) as refused:
        train(load_config(None, changed), resume=True, progress=False)
    message = str(refused.value)
    assert message.startswith(f"{key}: ") and before in message and after in message
    assert f"train.resume_allow_changes=[{key}]" in message and "\n" not in message
    allowed = load_config(None, changed + [f"train.resume_allow_changes=[{key}]", "train.max_steps=2"])
    assert train(allowed, resume=True, progress=False).step == 2


def test_the_same_folder_by_another_spelling_is_the_same_data(image_folder: Path, tmp_path: Path) -> None:
    overrides = _first_part(image_folder, tmp_path / "run")
    spelled = overrides + [f"data.path={image_folder}/./", "train.max_steps=2"]
    assert train(load_config(None, spelled), resume=True, progress=False).step == 2


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "before-the-field"])
def test_another_world_size_is_always_refused(image_folder: Path, tmp_path: Path, recorded: bool) -> None:
    run = tmp_path / "run"
    overrides = _first_part(image_folder, run)
    assert load_checkpoint(run / CHECKPOINT_NAME)["plan"]["world_size"] == 1
    # As if written by 2 processes; a checkpoint from before the field tells by its global batch.
    _edit_plan(run, world_size=2 if recorded else None, global_batch_size=8)
    allow_all = "train.resume_allow_changes=[data.path,data.batch_size]"
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), this resume runs 1"):
        train(load_config(None, overrides + [allow_all]), resume=True, progress=False)


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "before-the-field"])
def test_a_changed_dataset_is_refused_unless_allowed(image_folder: Path, tmp_path: Path, recorded: bool) -> None:
    run = tmp_path / "run"
    overrides = _first_part(image_folder, run)
    assert load_checkpoint(run / CHECKPOINT_NAME)["plan"]["dataset_size"] == 16
    if not recorded:
        _edit_plan(run, dataset_size=None)  # 16 images, batch 4: 4 steps per epoch tell instead
    make_image_folder(image_folder / "more", classes=1, per_class=4, seed=7)  # 20 images now, 5 steps an epoch
    with pytest.raises(ConfigError, match=r"data.path: .* (lists 20 images, 16|gives 5 steps per epoch, 4) when"):
        train(load_config(None, overrides), resume=True, progress=False)
    allowed = overrides + ["train.resume_allow_changes=[data.path]", "train.max_steps=2"]
    assert train(load_config(None, allowed), resume=True, progress=False).step == 2


def test_resume_allow_changes_names_only_what_may_change() -> None:
    with pytest.raises(ConfigError, match=r"train.resume_allow_changes: unknown \['model.arch'\]"):
        load_config(None, ["train.resume_allow_changes=[model.arch]"])


def _config_file(tmp_path: Path) -> str:
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    return str(path)


def test_resuming_a_finished_run_says_so_and_trains_nothing(
    image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    args = ["pretrain", "--config", _config_file(tmp_path), "--no-progress", *tiny_overrides(image_folder, run)]
    assert main(args) == 0  # 8 steps: 16 images / batch 4 x 2 epochs
    checkpoint = (run / CHECKPOINT_NAME).resolve().read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*args, "--resume"]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("already finished at step 8") for line in lines), lines
    assert not any(line.startswith("done:") for line in lines)  # no "done: step 8/8, loss nan, 0.0 images/s"
    assert (run / CHECKPOINT_NAME).resolve().read_bytes() == checkpoint
    assert (run / "metrics.jsonl").read_text() == metrics


def test_resuming_a_run_whose_budget_is_spent_trains_nothing(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = tiny_overrides(image_folder, run) + ["optim.epochs=1000", "train.budget_minutes=5"]
    train(load_config(None, overrides + ["train.max_steps=2"]), progress=False)
    path = (run / CHECKPOINT_NAME).resolve()
    save_checkpoint(path, {**load_checkpoint(path), "train_minutes": 5.5})  # as if the 2 steps took 5.5 minutes
    result = train(load_config(None, overrides), resume=True, progress=False)
    assert result.already_finished and result.step == 2
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
