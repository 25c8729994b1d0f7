from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from timm.layers import Mlp

import ibot.models.heads
from ibot.config import Config
from ibot.data.collate import Batch
from ibot.errors import ConfigError
from ibot.method import IBOT
from ibot.models.heads import ProjectionHead
from ibot.models.local_mlp import DepthwiseConvMlp
from ibot.models.vit import MaskedViT


def make_batch(b: int = 3, size: int = 16, local: int = 8, num_local: int = 2, grid: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * b, grid * grid, dtype=torch.bool)
    mask[0, [1, 2, 5]] = True
    mask[b + 1, [0, 15]] = True
    return Batch(
        global_crops=torch.randn(2 * b, 3, size, size, generator=g),
        local_crops=torch.randn(num_local * b, 3, local, local, generator=g),
        mask=mask,
        labels=torch.zeros(b, dtype=torch.long),
    )


@pytest.fixture
def method(tiny_config: Config) -> IBOT:
    torch.manual_seed(0)
    return IBOT(tiny_config.model, tiny_config.loss, tiny_config.data.global_crop_size)


class TestMaskedViT:
    # With the conv stem, the token below the masked patch (3 -> 7 on the 4 x 4 grid) loses its
    # view of the masked pixels, so it changes too.
    @pytest.mark.parametrize(("stem", "changed"), [("patch", [3]), ("conv", [3, 7])])
    def test_mask_token_replaces_patches_before_position_embedding(self, stem: str, changed: list[int]) -> None:
        torch.manual_seed(0)
        vit = MaskedViT("vit_pico", patch_size=4, img_size=16, stem=stem).eval()
        images = torch.randn(2, 3, 16, 16)
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[0, 3] = True
        embedded = vit.embed(images, mask)
        plain = vit.embed(images)
        # Only tokens of image 0 differ, and the masked one equals mask token + its position embedding.
        diff = (embedded != plain).any(dim=-1)
        assert diff.nonzero().tolist() == [[0, 1 + i] for i in changed]
        expected = vit.mask_token.flatten() + vit.vit.pos_embed[0, 1 + 3]
        assert torch.allclose(embedded[0, 1 + 3], expected)

    @pytest.mark.parametrize("stem", ["patch", "conv"])
    def test_tokens_and_local_crop_sizes(self, stem: str) -> None:
        vit = MaskedViT("vit_pico", patch_size=4, img_size=16, stem=stem)
        out = vit(torch.randn(2, 3, 16, 16))
        assert out.cls.shape == (2, 48) and out.patches.shape == (2, 16, 48)
        assert vit(torch.randn(5, 3, 8, 8)).patches.shape == (5, 4, 48)  # pos-embed resampled

    def test_conv_stem_receptive_field_and_masked_pixels_hidden(self) -> None:
        torch.manual_seed(0)
        vit = MaskedViT("vit_pico", patch_size=4, img_size=16, stem="conv")
        assert [type(m) for m in vit.vit.patch_embed.backbone] == [torch.nn.Conv2d, torch.nn.GELU] * 2
        images = torch.randn(1, 3, 16, 16)
        changed = images.clone()
        changed[..., 4:8, 4:8] += 1.0  # the patch at row 1, column 1 of the 4 x 4 grid
        moved = (vit.vit.patch_embed(images) != vit.vit.patch_embed(changed)).any(dim=-1)[0]
        # Two 3x3 stride-2 convolutions: a token sees its patch and the 3 pixels above and left
        # of it, so the patch reaches its own token and those below and right of it...
        assert moved.nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
        # ... unless it is masked: then no token sees its pixels.
        mask = torch.zeros(1, 16, dtype=torch.bool)
        mask[0, 1 * 4 + 1] = True
        assert torch.equal(vit.embed(images, mask), vit.embed(changed, mask))
        assert not torch.equal(vit.embed(images), vit.embed(changed))

    def test_deeper_conv_stem_sees_further_and_still_hides_masked_pixels(self) -> None:
        torch.manual_seed(0)
        vit = MaskedViT("vit_pico", patch_size=4, img_size=32, stem="conv", stem_convs_per_stage=2)
        convs = [m for m in vit.vit.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)]
        assert [c.stride for c in convs] == [(2, 2), (1, 1), (2, 2), (1, 1)]
        assert convs[-1].out_channels == 24  # half the width; the 1x1 projection makes it 48
        images = torch.randn(1, 3, 32, 32)
        changed = images.clone()
        changed[..., 4:8, 4:8] += 1.0  # the patch at row 1, column 1 of the 8 x 8 grid
        moved = (vit.vit.patch_embed(images) != vit.vit.patch_embed(changed)).any(dim=-1)[0]
        # With a stride-1 convolution after each strided one a token sees 9 pixels beyond its
        # patch on every side (3 above and left with one per stage): the patch reaches tokens
        # 0-4 in both directions.
        assert moved.nonzero().tolist() == [[r, c] for r in range(5) for c in range(5)]
        mask = torch.zeros(1, 64, dtype=torch.bool)
        mask[0, 1 * 8 + 1] = True
        assert torch.equal(vit.embed(images, mask), vit.embed(changed, mask))

    def test_mlp_dwconv_mixes_grid_neighbours_and_leaves_cls_alone(self, tiny_config: Config) -> None:
        torch.manual_seed(0)
        vit = MaskedViT.from_config(replace(tiny_config.model, arch="vit_pico", mlp_dwconv=True), 16)
        mlp = vit.vit.blocks[0].mlp
        assert isinstance(mlp, DepthwiseConvMlp)
        tokens = torch.randn(1, 1 + 16, vit.embed_dim)
        changed = tokens.clone()
        changed[0, 1 + 1 * 4 + 1] += 1.0  # the patch at row 1, column 1 of the 4 x 4 grid
        moved = (mlp(tokens) != mlp(changed)).any(dim=-1)[0]
        # The [cls] token skips the convolution; a patch reaches its 3 x 3 neighbourhood.
        assert not moved[0]
        assert [divmod(i, 4) for i in moved[1:].nonzero().flatten().tolist()] == [
            (r, c) for r in range(3) for c in range(3)
        ]
        # With the convolution zeroed the block's MLP is timm's: the branch is residual.
        plain = Mlp(vit.embed_dim, mlp.fc1.out_features)
        plain.load_state_dict({k: v for k, v in mlp.state_dict().items() if not k.startswith("dwconv")})
        torch.nn.init.zeros_(mlp.dwconv.weight)
        torch.nn.init.zeros_(mlp.dwconv.bias)
        assert torch.allclose(mlp(tokens), plain(tokens))
        assert vit(torch.randn(2, 3, 8, 8)).patches.shape == (2, 4, vit.embed_dim)  # a 2 x 2 local crop
        with pytest.raises(ValueError, match="model.mlp_dwconv needs a square patch grid"):
            vit(torch.randn(1, 3, 16, 8))

    def test_conv_stem_needs_a_power_of_two_patch(self, tiny_config: Config) -> None:
        with pytest.raises(ValueError, match="model.stem=conv"):
            MaskedViT("vit_pico", patch_size=6, img_size=18, stem="conv")
        with pytest.raises(ConfigError, match="model.stem"):
            replace(tiny_config.model, stem="resnet")
        with pytest.raises(ConfigError, match="model.stem: conv needs a power-of-two"):
            replace(tiny_config.model, stem="conv", patch_size=6)
        assert replace(tiny_config.model, stem="conv", patch_size=8).stem == "conv"
        with pytest.raises(ConfigError, match="model.stem_convs_per_stage"):
            replace(tiny_config.model, stem_convs_per_stage=0)

    def test_depth_replaces_the_arch_block_count(self, tiny_config: Config) -> None:
        arch_depth = len(MaskedViT("vit_pico", 4, 16).vit.blocks)
        shallow = MaskedViT.from_config(replace(tiny_config.model, arch="vit_pico", depth=1), 16)
        assert arch_depth == 2 and len(shallow.vit.blocks) == 1
        assert shallow(torch.randn(2, 3, 16, 16)).cls.shape == (2, 48)

    def test_bf16_residual_stream_under_autocast_only(self) -> None:
        torch.manual_seed(0)
        vit = MaskedViT("vit_tiny", 4, 16, depth=2).eval()
        images = torch.randn(2, 3, 16, 16)
        seen: list[torch.dtype] = []
        vit.vit.blocks[1].register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fp32_stream = vit(images).patches.float()
            vit.set_residual_dtype(torch.bfloat16)
            bf16_stream = vit(images).patches.float()
        outside = vit(images).patches  # fp32 weights, no autocast: the stream must stay fp32
        assert seen == [torch.float32, torch.bfloat16, torch.float32]
        assert outside.dtype == torch.float32
        assert not torch.equal(bf16_stream, fp32_stream)
        torch.testing.assert_close(bf16_stream, fp32_stream, atol=0.1, rtol=0.05)

    @pytest.mark.parametrize(
        ("precision", "residual", "expected"),
        [
            ("bf16", "auto", torch.bfloat16),
            ("fp32", "auto", None),
            ("bf16", "fp32", None),
            ("bf16", "amp", torch.bfloat16),
        ],
    )
    def test_runtime_resolves_the_residual_dtype_on_cpu(
        self, tiny_config: Config, precision: str, residual: str, expected: torch.dtype | None
    ) -> None:
        from ibot.runtime import Runtime

        train = replace(tiny_config.train, device="cpu", precision=precision, residual_precision=residual)
        assert Runtime.resolve(train).residual_dtype is expected


class TestProjectionHead:
    def test_matmuls_see_padded_row_counts_and_padding_changes_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Masked-token counts vary per step; the head's matmuls must see few shapes (see ``forward``)."""
        torch.manual_seed(0)
        head = ProjectionHead(8, 10, hidden_dim=16, bottleneck_dim=4)
        rows: list[int] = []
        head.mlp[0].register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
        tokens = torch.randn(130, 8, requires_grad=True)
        padded = head(tokens)
        padded.sum().backward()
        grads = [tokens.grad] + [p.grad for p in head.parameters()]
        monkeypatch.setattr(ibot.models.heads, "ROW_MULTIPLE", 1)
        tokens.grad = None
        head.zero_grad()
        plain = head(tokens)
        plain.sum().backward()
        assert rows == [256, 130] and padded.shape == plain.shape == (130, 10)
        torch.testing.assert_close(padded, plain)
        for padded_grad, grad in zip(grads, [tokens.grad] + [p.grad for p in head.parameters()]):
            torch.testing.assert_close(padded_grad, grad)  # None (frozen prototype norms) alike

    def test_shapes_and_fixed_prototype_norms(self) -> None:
        head = ProjectionHead(8, 10, hidden_dim=16, bottleneck_dim=4, num_layers=3, norm_last_layer=True)
        assert head(torch.randn(5, 8)).shape == (5, 10)
        g = head.last_layer.parametrizations.weight.original0
        assert not g.requires_grad and torch.all(g == 1)
        # logits are cosines: |logit| <= 1 with unit prototypes and a unit bottleneck
        assert head(torch.randn(50, 8)).abs().max() <= 1 + 1e-5

    def test_trainable_norms_option(self) -> None:
        head = ProjectionHead(8, 10, norm_last_layer=False)
        assert head.last_layer.parametrizations.weight.original0.requires_grad


class TestIBOT:
    def test_loss_is_finite_and_has_both_parts(self, method: IBOT) -> None:
        out = method(make_batch(), teacher_temp=0.04)
        assert torch.isfinite(out.total) and set(out.parts) == {"cls", "patch"}
        assert out.parts["patch"] > 0 and out.parts["cls"] > 0

    def test_loss_matches_a_hand_assembly_of_the_view_pairs(self, method: IBOT, tiny_config: Config) -> None:
        """[cls]: teacher global i against every student view j != i; patches: masked positions only.

        Built here from the backbones and heads alone, so a wrong pairing (a view against
        itself, globals and locals swapped), a wrong mean or a center used after its update
        shows up as a different number.
        """
        batch, temp, student_temp = make_batch(), 0.04, tiny_config.loss.student_temp
        _random_centers(method)
        cls_center, patch_center = method.cls_center.center.clone(), method.patch_targets.center.center.clone()
        out = method(batch, teacher_temp=temp)
        with torch.no_grad():
            teacher, teacher_head = method.teacher["backbone"](batch.global_crops), method.teacher["head"]
            backbone, head = method.student["backbone"], method.student["head"]
            student = backbone(batch.global_crops, batch.mask)  # masked globals
            student_cls = torch.cat([student.cls, backbone(batch.local_crops).cls])  # globals, then locals
            b = batch.batch_size
            teacher_probs = torch.softmax((teacher_head(teacher.cls) - cls_center) / temp, -1).view(2, b, -1)
            student_log = torch.log_softmax(head(student_cls) / student_temp, -1).view(-1, b, teacher_probs.shape[-1])
            pairs = [(i, j) for i in range(2) for j in range(len(student_log)) if j != i]
            cls_loss = sum(-(teacher_probs[i] * student_log[j]).sum(-1).mean() for i, j in pairs) / len(pairs)
            per_crop = []  # mean over each crop's masked patches; unmasked crops count as 0
            for c, where in enumerate(batch.mask):
                t = torch.softmax((teacher_head(teacher.patches[c, where]) - patch_center) / temp, -1)
                s = torch.log_softmax(head(student.patches[c, where]) / student_temp, -1)
                per_crop.append(-(t * s).sum(-1).mean() if where.any() else torch.tensor(0.0))
            patch_loss = torch.stack(per_crop).mean()
        assert len(pairs) == 6  # 2 teacher globals x (2 + 2 student views - the same crop)
        torch.testing.assert_close(out.parts["cls"], cls_loss)
        torch.testing.assert_close(out.parts["patch"], patch_loss)
        torch.testing.assert_close(out.total.detach(), cls_loss + patch_loss)

    def test_no_gradient_reaches_the_teacher(self, method: IBOT) -> None:
        method.train()
        method(make_batch(), teacher_temp=0.04).total.backward()
        assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())

    def test_teacher_stays_in_eval_mode(self, method: IBOT) -> None:
        method.train()
        assert method.student.training and not method.teacher.training
        assert not any(m.training for m in method.teacher.modules())

    def test_ema_update_formula(self, method: IBOT) -> None:
        with torch.no_grad():
            for p in method.student.parameters():
                p.add_(torch.randn_like(p))
        teacher_before = [p.clone() for p in method.teacher.parameters()]
        student = [p.clone() for p in method.student.parameters()]
        method.update_teacher(0.9)
        for t_new, t_old, s in zip(method.teacher.parameters(), teacher_before, student):
            assert torch.allclose(t_new, 0.9 * t_old + 0.1 * s, atol=1e-6)
        method.update_teacher(1.0)  # momentum 1 leaves the teacher unchanged
        method.update_teacher(0.0)  # momentum 0 copies the student
        assert all(torch.equal(t, s) for t, s in zip(method.teacher.parameters(), method.student.parameters()))

    def test_centers_step_once_per_forward(self, method: IBOT, tiny_config: Config) -> None:
        # One EMA step each: c <- m c + (1 - m) mean(teacher logits), over all global [cls]
        # tokens and over the masked patches only. Two steps (or none) give another center.
        batch, m = make_batch(), tiny_config.loss.center_momentum
        _random_centers(method)
        before = method.cls_center.center.clone(), method.patch_targets.center.center.clone()
        with torch.no_grad():
            tokens, head = method.teacher["backbone"](batch.global_crops), method.teacher["head"]
            cls_mean = head(tokens.cls).mean(dim=0, keepdim=True)
            patch_mean = head(tokens.patches[batch.mask]).mean(dim=0, keepdim=True)
        method(batch, teacher_temp=0.04)
        torch.testing.assert_close(method.cls_center.center, m * before[0] + (1 - m) * cls_mean)
        torch.testing.assert_close(method.patch_targets.center.center, m * before[1] + (1 - m) * patch_mean)

    def test_patch_loss_only_sees_masked_tokens(self, method: IBOT) -> None:
        batch = make_batch()
        student = method.student_logits(batch).heads
        teacher, _ = method.teacher_logits(batch)
        assert student.patch_logits.shape[0] == teacher.patch_logits.shape[0] == int(batch.mask.sum()) == 5
        assert student.cls_logits.shape[0] == 4 * batch.batch_size  # 2 global + 2 local views

    def test_koleo_term_is_added_when_weighted(self, tiny_config: Config) -> None:
        from dataclasses import replace

        batch = make_batch()
        torch.manual_seed(0)
        plain = IBOT(tiny_config.model, tiny_config.loss, 16)(batch, 0.04)
        torch.manual_seed(0)
        method = IBOT(tiny_config.model, replace(tiny_config.loss, koleo_weight=0.5), 16)
        out = method(batch, 0.04)
        assert "koleo" not in plain.parts and torch.isfinite(out.parts["koleo"])
        assert out.total.item() == pytest.approx((plain.total + 0.5 * out.parts["koleo"]).item(), rel=1e-5)
        torch.manual_seed(0)
        scheduled = IBOT(tiny_config.model, replace(tiny_config.loss, koleo_weight=0.5), 16)(
            batch, 0.04, koleo_weight=0.2
        )
        assert scheduled.total.item() == pytest.approx((plain.total + 0.2 * scheduled.parts["koleo"]).item(), rel=1e-5)
        out.total.backward()  # KoLeo reaches the backbone (it acts on backbone [cls], not the head)
        assert method.student["backbone"].vit.cls_token.grad is not None

    @pytest.mark.parametrize("centering", ["sinkhorn_knopp", "none"])
    def test_stateless_centerings_train_and_save_no_center(self, tiny_config: Config, centering: str) -> None:
        from dataclasses import replace

        loss_cfg = replace(tiny_config.loss, cls_centering=centering, patch_centering=centering)
        method = IBOT(tiny_config.model, loss_cfg, 16)
        out = method(make_batch(), 0.04)
        assert torch.isfinite(out.total) and out.parts["patch"] > 0
        out.total.backward()
        assert not any("center" in key for key in method.state_dict())

    def test_separate_heads(self, tiny_config: Config) -> None:
        from dataclasses import replace

        model_cfg = replace(tiny_config.model, shared_head=False)
        method = IBOT(model_cfg, tiny_config.loss, 16)
        assert set(method.student.keys()) == {"backbone", "cls_head", "patch_head"}
        assert torch.isfinite(method(make_batch(), 0.04).total)

    def test_param_groups_exclude_norms_biases_and_tokens_from_decay(self, method: IBOT) -> None:
        groups = method.param_groups()
        names = {id(p): n for n, p in method.student.named_parameters()}
        grouped = [names[id(p)] for g in groups for p in g["params"]]
        no_decay = {names[id(p)] for g in groups if not g["apply_wd"] for p in g["params"]}
        last_layer = {names[id(p)] for g in groups if g["is_last_layer"] for p in g["params"]}
        # Every trainable parameter in exactly one group; the frozen prototype norms in none.
        trainable = [n for n, p in method.student.named_parameters() if p.requires_grad]
        assert sorted(grouped) == sorted(trainable)
        assert "head.last_layer.parametrizations.weight.original0" not in grouped

        def exempt(name: str) -> bool:
            return name.endswith("bias") or "norm" in name or "token" in name or "pos_embed" in name

        # Exactly the exempt ones: both an empty and an everything no-decay set fail here.
        assert no_decay == {n for n in trainable if exempt(n)}
        for name in ("backbone.vit.cls_token", "backbone.vit.pos_embed", "backbone.mask_token"):
            assert name in no_decay  # 2-d or more: exempt by name, not by shape
        assert "backbone.vit.blocks.0.norm1.weight" in no_decay and "head.mlp.0.bias" in no_decay
        assert "backbone.vit.blocks.0.attn.qkv.weight" not in no_decay and "head.mlp.0.weight" not in no_decay
        assert last_layer == {"head.last_layer.parametrizations.weight.original1"}


def _random_centers(method: IBOT) -> None:
    """Non-zero EMA centers, so a test also sees which center a forward used and how it moved."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for center in (method.cls_center.center, method.patch_targets.center.center):
            center.copy_(torch.randn(center.shape, generator=g))


class TestEfficientDropPath:
    def test_expectation_and_subset(self) -> None:
        from ibot.models.drop_path import residual_on_subset

        torch.manual_seed(0)
        x = torch.zeros(8, 2, 3)
        calls = []

        def branch(y: torch.Tensor) -> torch.Tensor:
            calls.append(y.shape[0])
            return torch.ones_like(y)

        out = residual_on_subset(x, branch, drop_rate=0.25)
        assert calls == [6]  # the branch ran on 6 of 8 samples only
        kept = out[:, 0, 0]
        assert sorted(kept.tolist()) == pytest.approx([0.0, 0.0] + [8 / 6] * 6)
        assert kept.mean().item() == pytest.approx(1.0)  # same expectation as no dropping

    def test_eval_mode_and_zero_rate_are_plain_blocks(self) -> None:
        torch.manual_seed(0)
        vit = MaskedViT("vit_pico", 4, 16, drop_path_rate=0.5)
        x = torch.randn(4, 3, 16, 16)
        vit.eval()
        a, b = vit(x).cls, vit(x).cls
        assert torch.equal(a, b)
        vit.train()
        assert not torch.equal(vit(x).cls, vit(x).cls)  # stochastic while training
        plain = MaskedViT("vit_pico", 4, 16, drop_path_rate=0.5, efficient_drop_path=False)
        plain.load_state_dict(vit.state_dict())  # same parameters either way
        plain.eval()
        assert torch.allclose(plain(x).cls, a, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients(tiny_config: Config) -> None:
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        method = IBOT(tiny_config.model, tiny_config.loss, 16)
        method.set_activation_checkpointing(enabled)
        method(make_batch(), teacher_temp=0.04).total.backward()
        grads.append([p.grad.clone() for p in method.student.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_collapse_monitors_tell_the_two_collapses_apart() -> None:
    from ibot.method import collapse_monitors
    from ibot.train.loop import collapse_warnings

    k = 16
    uniform = collapse_monitors("cls", torch.full((8, k), 1 / k))
    assert uniform["cls_teacher_entropy"].item() == pytest.approx(torch.log(torch.tensor(16.0)).item())
    one_hot = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), k).float()
    one = collapse_monitors("patch", one_hot)
    assert one["patch_prototypes_used"].item() == 1 and one["patch_perplexity"].item() == pytest.approx(1.0)
    spread = collapse_monitors("cls", torch.eye(k)[:8])
    assert spread["cls_prototypes_used"].item() == 8 and spread["cls_perplexity"].item() == pytest.approx(8.0)
    values = {key: float(v) for key, v in {**uniform, **one}.items()}
    assert set(collapse_warnings(values, k)) == {("cls", "uniform"), ("patch", "one prototype")}
    healthy = {key: float(v) for key, v in spread.items()}
    assert collapse_warnings(healthy, k) == {}


def test_forward_reports_collapse_monitors(method: IBOT) -> None:
    assert method(make_batch(), 0.04).monitors == {}  # only when asked: not on every step
    out = method(make_batch(), 0.04, monitors=True)
    for branch in ("cls", "patch"):
        assert 0 <= out.monitors[f"{branch}_teacher_entropy"] <= torch.log(torch.tensor(32.0)) + 1e-4
        assert 1 <= out.monitors[f"{branch}_prototypes_used"] <= 32
        assert out.monitors[f"{branch}_kl"] >= -1e-5  # a KL divergence, whatever the loss weighting
    kl = out.parts["cls"] - out.monitors["cls_teacher_entropy"]
    assert out.monitors["cls_kl"].item() == pytest.approx(kl.item())
