"""MIM target variants (``mim.target``) and the stabiliser switches of the referees' ablations."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_method import make_batch

from ibot.config import Config, MimConfig, load_config
from ibot.data.collate import MultiCropCollate
from ibot.data.loaders import training_mask_config
from ibot.errors import ConfigError, DataError
from ibot.losses.patch_targets import CodebookTargets
from ibot.method import IBOT


def build(cfg: Config, seed: int = 0, **mim: object) -> IBOT:
    torch.manual_seed(seed)
    return IBOT(cfg.model, replace(cfg.loss, patch_centering="none"), 16, MimConfig(**mim))  # type: ignore[arg-type]


def patch_targets(method: IBOT, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    teacher, patches = method.teacher_logits(batch)
    return method.patch_targets(batch.global_crops, batch.masked_indices(), (patches, teacher.patch_logits), 0.04)


def perturb_teacher(method: IBOT) -> None:
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    method.update_teacher(0.0)  # teacher <- student


class TestFixedTokenizers:
    def test_online_targets_follow_the_teacher_random_ones_do_not(self, tiny_config: Config) -> None:
        batch = make_batch()
        online, fixed = build(tiny_config), build(tiny_config, target="random")
        before = patch_targets(online, batch), patch_targets(fixed, batch)
        assert torch.allclose(before[0], before[1])  # same init, same targets at step 0
        for method in (online, fixed):
            perturb_teacher(method)
        assert not torch.allclose(patch_targets(online, batch), before[0], atol=1e-4)
        assert torch.equal(patch_targets(fixed, batch), before[1])
        # The fixed tokenizer is no part of what the optimiser or the EMA touch.
        assert not any(p.requires_grad for p in fixed.patch_targets.parameters())

    def test_random_target_trains_the_student_from_the_fixed_network(self, tiny_config: Config) -> None:
        method = build(tiny_config, target="random")
        out = method(make_batch(), teacher_temp=0.04)
        out.total.backward()
        assert torch.isfinite(out.total) and out.parts["patch"] > 0
        assert all(p.grad is None for p in method.patch_targets.parameters())

    def test_frozen_target_loads_an_earlier_runs_teacher(self, tiny_config: Config, tmp_path: Path) -> None:
        earlier = build(tiny_config, seed=1)
        perturb_teacher(earlier)
        torch.save({"method": earlier.state_dict()}, tmp_path / "checkpoint.pt")
        method = build(tiny_config, seed=2, target="frozen", tokenizer_path=str(tmp_path))
        tokenizer = method.patch_targets.branch
        for (name, p), q in zip(tokenizer.named_parameters(), earlier.teacher.parameters()):
            assert torch.equal(p, q), name
        batch = make_batch()
        assert torch.allclose(patch_targets(method, batch), patch_targets(earlier, batch), atol=1e-6)

    def test_frozen_target_names_the_file_when_shapes_differ(self, tiny_config: Config, tmp_path: Path) -> None:
        other = IBOT(replace(tiny_config.model, out_dim=64), tiny_config.loss, 16)
        torch.save({"method": other.state_dict()}, tmp_path / "checkpoint.pt")
        with pytest.raises(DataError, match="checkpoint.pt.*wrong shape"):
            build(tiny_config, target="frozen", tokenizer_path=str(tmp_path))
        with pytest.raises(DataError, match="checkpoint not found"):
            build(tiny_config, target="frozen", tokenizer_path=str(tmp_path / "missing"))


class TestCodebook:
    def clustered_tokens(self, n: int, centres: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(len(centres), (n,), generator=g)
        return centres[labels] + 0.05 * torch.randn(n, centres.shape[1], generator=g), labels

    def step(self, codebook: CodebookTargets, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens.unsqueeze(0)  # (1, M, D): every token masked
        return codebook(torch.empty(0), torch.arange(tokens.shape[0]), (patches, None), 0.04)

    def test_one_hot_targets_of_the_nearest_code(self) -> None:
        torch.manual_seed(0)
        codebook = CodebookTargets(num_codes=16, dim=8)
        tokens = torch.randn(40, 8)
        probs = self.step(codebook, tokens)
        assert probs.shape == (40, 16) and torch.equal(probs.sum(-1), torch.ones(40))
        expected = (F.normalize(tokens, dim=-1) @ codebook.codebook.t()).argmax(-1)
        assert torch.equal(self.step(codebook, tokens).argmax(-1), expected)

    def test_codes_learn_the_clusters(self) -> None:
        torch.manual_seed(0)
        centres = F.normalize(torch.randn(4, 8), dim=-1) * 3
        codebook = CodebookTargets(num_codes=8, dim=8, decay=0.9, restart_steps=5)
        for step in range(60):
            self.step(codebook, self.clustered_tokens(64, centres, step)[0])
        tokens, labels = self.clustered_tokens(400, centres, 999)
        codes = codebook.assign(tokens)
        # Every code holds one cluster only (purity 1) and every cluster has a code.
        for code in codes.unique():
            assert labels[codes == code].unique().numel() == 1
        assert codes.unique().numel() >= 4
        nearest = (F.normalize(centres, dim=-1) @ codebook.codebook.t()).max(dim=-1).values
        assert torch.all(nearest > 0.99)

    def test_dead_codes_restart_at_batch_tokens(self) -> None:
        torch.manual_seed(0)
        codebook = CodebookTargets(num_codes=8, dim=4, decay=0.9, restart_steps=3)
        one_direction = F.normalize(torch.tensor([[1.0, 0.2, 0.0, 0.0]]), dim=-1)
        self.step(codebook, torch.randn(32, 4))  # first batch seeds the codes
        with torch.no_grad():  # code 7 points away from everything that will come
            codebook.codebook[7] = -one_direction[0]
        for _ in range(3):
            self.step(codebook, one_direction.repeat(16, 1) + 0.01 * torch.randn(16, 4))
        assert codebook.codebook[7] @ one_direction[0] > 0.9  # restarted near the data
        assert int(codebook.idle_steps[7]) == 0

    def test_vq_method_step(self, tiny_config: Config) -> None:
        method = build(tiny_config, target="vq")
        out = method(make_batch(), teacher_temp=0.04, monitors=True)
        out.total.backward()
        assert torch.isfinite(out.total)
        assert out.monitors["patch_teacher_entropy"] == 0  # one-hot targets
        assert 1 <= out.monitors["patch_prototypes_used"] <= 5  # 5 masked tokens in make_batch


class TestNoMIM:
    def test_plain_dino_draws_no_masks_and_has_no_patch_loss(self, tiny_config: Config, tmp_path: Path) -> None:
        cfg = replace(tiny_config, mim=MimConfig(target="none"))
        assert training_mask_config(cfg).probability == 0 and training_mask_config(tiny_config).probability > 0
        collate = MultiCropCollate(training_mask_config(cfg), grid=4)
        from ibot.data.datasets import Sample
        from ibot.data.transforms import Crops

        view = Crops(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8))
        batch = collate([Sample(i, view, 0, seed=i) for i in range(3)])
        assert batch is not None and not batch.mask.any()
        out = build(tiny_config, target="none")(batch, teacher_temp=0.04)
        assert out.parts["patch"] == 0 and out.parts["cls"] > 0


class TestStabiliserSwitches:
    def test_sharpening_off_means_the_student_temperature(self, tiny_config: Config) -> None:
        batch = make_batch()
        torch.manual_seed(0)
        sharp = IBOT(tiny_config.model, tiny_config.loss, 16)(batch, teacher_temp=0.1)
        for branch in ("cls", "patch"):
            loss_cfg = replace(tiny_config.loss, **{f"{branch}_sharpening": False})
            torch.manual_seed(0)
            flat = IBOT(tiny_config.model, loss_cfg, 16)(batch, teacher_temp=0.04)
            other = "patch" if branch == "cls" else "cls"
            assert torch.allclose(flat.parts[branch], sharp.parts[branch])  # 0.04 ignored: T_t = T_s = 0.1
            torch.manual_seed(0)
            sharp_004 = IBOT(tiny_config.model, tiny_config.loss, 16)(batch, teacher_temp=0.04)
            assert torch.allclose(flat.parts[other], sharp_004.parts[other])  # the other branch still sharpens
            assert not torch.allclose(flat.parts[branch], sharp_004.parts[branch])

    def test_checkpoints_with_the_old_patch_center_name_load(self, tiny_config: Config) -> None:
        state = IBOT(tiny_config.model, tiny_config.loss, 16).state_dict()
        state["patch_center.center"] = torch.full_like(state.pop("patch_targets.center.center"), 3.0)
        method = IBOT(tiny_config.model, tiny_config.loss, 16)
        method.load_state_dict(state)  # strict: the renamed key is the only patch center
        assert torch.all(method.patch_targets.center.center == 3.0)


class TestConfig:
    def test_bad_values_name_the_key(self) -> None:
        with pytest.raises(ConfigError, match="mim.target"):
            load_config(None, ["mim.target=bert"])
        with pytest.raises(ConfigError, match="mim.tokenizer_path"):
            load_config(None, ["mim.target=frozen"])
