from __future__ import annotations

from pathlib import Path

import pytest

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
    cfg = load_config(None, ["data.batch_size=64", "optim.lr=5e-4", "optim.epochs=3"])
    plan = RunPlan.derive(cfg, dataset_size=1000, world_size=4)
    assert plan.global_batch_size == 256
    assert plan.lr == pytest.approx(5e-4)
    assert plan.steps_per_epoch == 3 and plan.total_steps == 9
