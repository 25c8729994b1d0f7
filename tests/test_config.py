from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ibot.config import Config, RunPlan, config_from_dict, load_config
from ibot.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


class TestLoadConfig:
    def test_defaults_follow_official_ibot(self) -> None:
        cfg = load_config()
        assert cfg.loss.teacher_temp == 0.07 and cfg.loss.warmup_teacher_temp == 0.04
        assert cfg.optim.weight_decay == 0.04 and cfg.optim.weight_decay_end == 0.4
        assert cfg.optim.momentum_teacher == 0.996 and cfg.loss.student_temp == 0.1

    def test_yaml_then_dotted_overrides(self, tmp_path: Path) -> None:
        path = tmp_path / "x.yaml"
        path.write_text("optim:\n  lr: 1.0e-3\n  epochs: 5\nmodel:\n  arch: vit_tiny\n")
        cfg = load_config(path, ["optim.lr=2e-3", "data.global_crop_scale=[0.3, 1.0]", "model.shared_head=false"])
        assert cfg.optim.lr == 2e-3  # CLI beats YAML
        assert cfg.optim.epochs == 5.0  # YAML beats defaults
        assert cfg.model.arch == "vit_tiny"
        assert cfg.data.global_crop_scale == (0.3, 1.0)
        assert cfg.model.shared_head is False

    def test_unknown_key_lists_valid_keys_and_suggests(self) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(None, ["optim.lrr=5"])
        message = str(info.value)
        assert "optim.lrr" in message and "did you mean optim.lr" in message
        assert "optim.weight_decay" in message and "\n" not in message

    def test_unknown_section(self) -> None:
        with pytest.raises(ConfigError, match="unknown config key optimizer"):
            load_config(None, ["optimizer.lr=1"])

    @pytest.mark.parametrize(
        "override, key",
        [
            ("optim.lr=abc", "optim.lr"),
            ("data.batch_size=1.5", "data.batch_size"),
            ("model.arch=vit_huge9", "model.arch"),
            ("model.depth=-1", "model.depth"),
            ("mask.ratio=0.9", "mask.ratio"),
            ("data.global_crop_scale=[0.5]", "data.global_crop_scale"),
            ("train.precision=fp8", "train.precision"),
            ("train.residual_precision=bf16", "train.residual_precision"),
            ("loss.patch_centering=softmax", "loss.patch_centering"),
        ],
    )
    def test_bad_values_name_the_key(self, override: str, key: str) -> None:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])

    # Values that used to pass and fail later (or never) with a traceback; each must stop at
    # load time with one line naming its key. Extra overrides keep the other keys valid, so
    # the named key is the only one at fault.
    @pytest.mark.parametrize(
        "overrides, key",
        [
            (["eval.knn_k=[]"], "eval.knn_k"),
            (["data.batch_size=0"], "data.batch_size"),
            (["eval.batch_size=0"], "eval.batch_size"),
            (["eval.probe_batch_size=-1"], "eval.probe_batch_size"),
            (["finetune.batch_size=0"], "finetune.batch_size"),
            (["data.global_crop_size=20"], "data.global_crop_size"),  # patch 16
            (["data.local_crop_size=40"], "data.local_crop_size"),
            (["model.patch_size=8", "data.global_crop_size=36", "data.local_crop_size=32"], "data.global_crop_size"),
            (["eval.image_size=33", "model.patch_size=4", "data.local_crop_size=16"], "eval.image_size"),
            (["optim.min_lr=1e-2", "optim.lr=1e-3"], "optim.min_lr"),
            (["optim.momentum_teacher=1.5"], "optim.momentum_teacher"),
            (["optim.momentum_teacher_end=1.01"], "optim.momentum_teacher_end"),
            (["optim.momentum_teacher_end=-0.1"], "optim.momentum_teacher_end"),
            (["loss.center_momentum=1.5"], "loss.center_momentum"),
            (["loss.center_momentum=-0.5"], "loss.center_momentum"),
            (["train.max_steps=-1"], "train.max_steps"),
            (["train.max_minutes=-5"], "train.max_minutes"),
            (["loss.koleo_weight=0.1", "data.batch_size=1"], "loss.koleo_weight"),
            (["optim.warmup_epochs=-1"], "optim.warmup_epochs"),
            (["optim.weight_decay_end=-0.1"], "optim.weight_decay_end"),
            (["optim.betas=[0.9, 1.0]"], "optim.betas"),
            (["data.std=[0.2, 0.0, 0.2]"], "data.std"),
            (["data.local_crop_size=0"], "data.local_crop_size"),
            (["eval.knn_temperature=0"], "eval.knn_temperature"),
            (["eval.probe_lrs=[]"], "eval.probe_lrs"),
            (["eval.probe_max_extensions=-1"], "eval.probe_max_extensions"),
            (["finetune.lr=0"], "finetune.lr"),
            (["finetune.label_smoothing=1.0"], "finetune.label_smoothing"),
            (["train.threads=-1"], "train.threads"),
            (["loss.warmup_teacher_temp_epochs=-1"], "loss.warmup_teacher_temp_epochs"),
            (["mask.min_block_patches=0"], "mask.min_block_patches"),
            (["model.head_bottleneck_dim=0"], "model.head_bottleneck_dim"),
        ],
    )
    def test_impossible_values_are_one_line_naming_the_key(self, overrides: list[str], key: str) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides)
        message = str(info.value)
        assert message.startswith(f"{key}:") and "\n" not in message

    @pytest.mark.parametrize(
        "overrides",
        [
            ["eval.knn_k=[1]", "data.batch_size=1", "eval.batch_size=1", "eval.probe_batch_size=1"],
            ["optim.min_lr=5e-4", "optim.lr=5e-4", "optim.momentum_teacher=0", "optim.momentum_teacher_end=1"],
            ["loss.center_momentum=0", "train.max_steps=0", "train.max_minutes=0", "finetune.batch_size=2"],
            ["loss.koleo_weight=0.1", "data.batch_size=2"],
            # no local crops: their size is unused, so it need not fit the patch grid
            ["data.num_local_crops=0", "data.local_crop_size=40"],
            ["model.patch_size=8", "data.global_crop_size=32", "data.local_crop_size=8", "eval.image_size=64"],
        ],
    )
    def test_edge_values_still_pass(self, overrides: list[str]) -> None:
        assert isinstance(load_config(None, overrides), Config)

    def test_cross_section_checks_also_guard_replace(self) -> None:
        cfg = load_config(None, ["model.patch_size=8", "data.global_crop_size=32", "data.local_crop_size=16"])
        with pytest.raises(ConfigError, match=r"^data\.global_crop_size: 36 is no multiple of model\.patch_size"):
            replace(cfg, data=replace(cfg.data, global_crop_size=36))
        with pytest.raises(ConfigError, match=r"^data\.local_crop_size"):
            replace(cfg, model=replace(cfg.model, patch_size=32))

    def test_bad_file_is_named(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.yaml"
        bad.write_text("optim: [unclosed\n")
        with pytest.raises(ConfigError, match="bad.yaml"):
            load_config(bad)
        with pytest.raises(ConfigError, match="missing.yaml"):
            load_config(tmp_path / "missing.yaml")

    def test_round_trip_through_dict(self) -> None:
        cfg = load_config(None, ["model.arch=vit_base", "eval.knn_k=[5, 7]"])
        assert config_from_dict(cfg.to_dict()) == cfg

    @pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
    def test_shipped_configs_parse(self, path: Path) -> None:
        assert isinstance(load_config(path), Config)


def test_run_plan_linear_scaling_rule() -> None:
    # optim.lr is per 256 images; a global batch of 256 would hide a missing scaling, so the
    # global batch here is 64 x 2 = 128 (half the rate) and, below, 64 x 8 = 512 (twice it).
    cfg = load_config(None, ["data.batch_size=64", "optim.lr=5e-4", "optim.epochs=3"])
    plan = RunPlan.derive(cfg, dataset_size=1000, world_size=2)
    assert plan.global_batch_size == 128
    assert plan.lr == pytest.approx(5e-4 * 128 / 256)
    assert plan.steps_per_epoch == 1000 // 128 and plan.total_steps == 3 * (1000 // 128)
    wide = RunPlan.derive(cfg, dataset_size=1000, world_size=8)
    assert wide.global_batch_size == 512 and wide.lr == pytest.approx(5e-4 * 512 / 256)


def test_test_helpers_are_valid_and_stay_on_the_cpu(tiny_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a CUDA machine: tiny_overrides (every CPU test's config, the 2-process ones too)
    # must not follow train.device=auto onto a GPU; only tests/test_cuda.py asks for one.
    from ibot.runtime import Runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tiny_config.train.device == "cpu"
    assert Runtime.resolve(tiny_config.train).device == torch.device("cpu")


class TestErrorsNameTheirCause:
    """With a config file, an error caused by a command-line override names the override, not the file."""

    @pytest.fixture
    def demo(self, tmp_path: Path) -> Path:
        path = tmp_path / "demo.yaml"
        path.write_text("optim:\n  lr: 1.0e-3\ndata:\n  batch_size: 8\n")
        return path

    @pytest.mark.parametrize(
        "overrides, culprit, says",
        [
            (["data.batch_sise=4"], "data.batch_sise=4", "unknown config key data.batch_sise"),
            (["train.seed=1", "optim.lr=abc"], "optim.lr=abc", "optim.lr: expected float"),
            (["data.batch_size=0", "train.seed=1"], "data.batch_size=0", "data.batch_size: must be >= 1"),
            # two wrong overrides: the first that breaks the config, with its own error
            (["optim.lrr=1", "data.batch_sise=4"], "optim.lrr=1", "unknown config key optim.lrr"),
        ],
    )
    def test_an_override_error_names_the_override(
        self, demo: Path, overrides: list[str], culprit: str, says: str
    ) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(demo, overrides)
        message = str(info.value)
        assert message.startswith(f"override {culprit}: {says}") and "demo.yaml" not in message
        assert "\n" not in message

    def test_a_file_error_still_names_the_file(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text("data:\n  batch_size: 0\noptim:\n  lr: 1.0e-3\n")
        # the override is fine, the file's own value is wrong
        with pytest.raises(ConfigError, match=r"^\S*bad\.yaml: data\.batch_size: must be >= 1"):
            load_config(path, ["train.seed=3"])
        path.write_text("optim:\n  lr: 1.0e-3\n  lrr: 2\n")
        with pytest.raises(ConfigError, match=r"^\S*bad\.yaml: unknown config key optim\.lrr"):
            load_config(path, ["optim.lrrr=1"])  # both wrong: the override is not the only cause

    def test_a_binary_config_file_is_one_line_naming_it(self, tmp_path: Path) -> None:
        path = tmp_path / "weights.yaml"
        path.write_bytes(bytes(range(256)) * 4)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value) == f"{path}: not a YAML text file (not UTF-8 text)"
