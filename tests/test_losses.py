from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ibot.losses import (
    Center,
    DINOClsLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    NoCentering,
    SinkhornKnopp,
    build_centering,
    soft_ce,
)


def _ce(p: list[float], logits: list[float], temp: float) -> float:
    """Hand cross-entropy -sum p log softmax(logits / temp), in plain Python."""
    z = [x / temp for x in logits]
    log_norm = math.log(sum(math.exp(x) for x in z))
    return -sum(pi * (zi - log_norm) for pi, zi in zip(p, z))


class TestIBOTPatchLoss:
    def setup_method(self) -> None:
        # 2 crops x 3 patches, K = 2. Crop 0 masks patches 0 and 2, crop 1 masks patch 1.
        self.mask = torch.tensor([[True, False, True], [False, True, False]])
        self.student_full = torch.tensor([[[1.0, 0.0], [5.0, -5.0], [0.0, 2.0]], [[3.0, 3.0], [0.5, -0.5], [9.0, 9.0]]])
        self.teacher_full = torch.tensor([[[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]], [[0.5, 0.5], [0.2, 0.8], [0.5, 0.5]]])

    def loss(self, student_full: torch.Tensor) -> torch.Tensor:
        return IBOTPatchLoss(student_temp=0.1)(student_full[self.mask], self.teacher_full[self.mask], self.mask)

    def test_matches_hand_computed_value(self) -> None:
        crop0 = (_ce([0.7, 0.3], [1.0, 0.0], 0.1) + _ce([0.1, 0.9], [0.0, 2.0], 0.1)) / 2
        crop1 = _ce([0.2, 0.8], [0.5, -0.5], 0.1) / 1
        assert self.loss(self.student_full).item() == pytest.approx((crop0 + crop1) / 2, rel=1e-5)

    def test_unmasked_positions_do_not_matter(self) -> None:
        reference = self.loss(self.student_full)
        changed = self.student_full.clone()
        changed[0, 1] = torch.tensor([-7.0, 7.0])  # unmasked
        changed[1, 2] = torch.tensor([4.0, -4.0])  # unmasked
        assert torch.equal(self.loss(changed), reference)
        changed[0, 0] = torch.tensor([-7.0, 7.0])  # masked
        assert not torch.allclose(self.loss(changed), reference)

    def test_unmasked_crops_count_in_the_average(self) -> None:
        # Adding a crop without masks dilutes the loss by C / (C + 1), as in iBOT and DINOv2.
        mask = torch.cat([self.mask, torch.zeros(1, 3, dtype=torch.bool)])
        loss = IBOTPatchLoss(0.1)(self.student_full[self.mask], self.teacher_full[self.mask], mask)
        assert loss.item() == pytest.approx(self.loss(self.student_full).item() * 2 / 3, rel=1e-6)

    def test_nothing_masked_gives_zero(self) -> None:
        mask = torch.zeros(2, 3, dtype=torch.bool)
        loss = IBOTPatchLoss(0.1)(torch.empty(0, 4), torch.empty(0, 4), mask)
        assert loss.item() == 0.0

    def test_shape_mismatch_raises(self) -> None:
        with pytest.raises(ValueError, match="expected"):
            IBOTPatchLoss(0.1)(torch.zeros(3, 2), torch.zeros(3, 4), self.mask)


class TestDINOClsLoss:
    def test_matches_explicit_pair_loop(self) -> None:
        torch.manual_seed(0)
        student = torch.randn(4, 5, 7)  # V = 4 views (2 global + 2 local), B = 5, K = 7
        teacher = torch.softmax(torch.randn(2, 5, 7), dim=-1)
        expected, pairs = 0.0, 0
        for t in range(2):
            for s in range(4):
                if s == t:
                    continue
                ce = -(teacher[t] * F.log_softmax(student[s] / 0.1, dim=-1)).sum(-1).mean()
                expected, pairs = expected + ce, pairs + 1
        assert pairs == 6
        assert DINOClsLoss(0.1)(student, teacher).item() == pytest.approx((expected / pairs).item(), rel=1e-5)

    def test_same_view_pair_is_excluded(self) -> None:
        # One teacher view (G = 1) and two student views: student view 0 is the same crop, so
        # whatever it predicts must not change the loss; view 1 must.
        torch.manual_seed(1)
        student = torch.randn(2, 3, 4)
        teacher = torch.softmax(torch.randn(1, 3, 4), dim=-1)
        base = DINOClsLoss(0.1)(student, teacher)
        changed = student.clone()
        changed[0] = torch.randn(3, 4) * 10
        assert torch.equal(DINOClsLoss(0.1)(changed, teacher), base)
        changed[1] = torch.randn(3, 4) * 10
        assert not torch.allclose(DINOClsLoss(0.1)(changed, teacher), base)

    def test_single_view_raises(self) -> None:
        with pytest.raises(ValueError, match="2 student views"):
            DINOClsLoss(0.1)(torch.randn(1, 2, 3), torch.softmax(torch.randn(1, 2, 3), -1))


class TestCenter:
    def test_probs_center_and_sharpen(self) -> None:
        center = Center(3, momentum=0.9)
        center.center.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        logits = torch.tensor([[2.0, 1.0, 0.0]])
        probs = center.probs(logits, teacher_temp=0.5)
        assert torch.allclose(probs, torch.full((1, 3), 1 / 3))  # centring removed the preference
        sharp = Center(3).probs(logits, 0.04)
        assert sharp[0, 0] > 0.99  # low temperature sharpens

    def test_ema_update(self) -> None:
        center = Center(2, momentum=0.9)
        center.center.copy_(torch.tensor([[1.0, -1.0]]))
        center.update(torch.tensor([[3.0, 1.0], [5.0, 3.0]]))  # batch mean [4, 2]
        assert torch.allclose(center.center, torch.tensor([[0.9 * 1 + 0.1 * 4, 0.9 * -1 + 0.1 * 2]]))

    def test_empty_update_keeps_center(self) -> None:
        center = Center(2)
        center.center.fill_(0.5)
        center.update(torch.empty(0, 2))
        assert torch.equal(center.center, torch.full((1, 2), 0.5))


class TestSinkhornKnopp:
    def test_rows_are_distributions_and_prototypes_share_the_batch(self) -> None:
        logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
        probs = SinkhornKnopp(iterations=50).probs(logits, teacher_temp=0.1)
        assert torch.allclose(probs.sum(dim=1), torch.ones(32), atol=1e-5)
        assert torch.allclose(probs.sum(dim=0), torch.full((8,), 32 / 8), atol=1e-2)

    def test_one_dominant_prototype_is_balanced_at_once(self) -> None:
        # Every sample prefers prototype 0: a fresh EMA center lets it win everywhere (centering
        # only catches up over ~1 / (1 - m) steps); Sinkhorn-Knopp spreads this very batch.
        logits = 0.1 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
        logits[:, 0] += 5.0
        assert (Center(8).probs(logits, 0.1).argmax(dim=1) == 0).all()
        probs = SinkhornKnopp().probs(logits, 0.1)
        assert probs.argmax(dim=1).unique().numel() >= 6
        assert probs.sum(dim=0).max() < 2 * 16 / 8

    def test_large_logits_do_not_overflow(self) -> None:
        logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        sk = SinkhornKnopp()
        assert torch.allclose(sk.probs(logits * 30 + 100, 0.04), sk.probs(logits * 30, 0.04), atol=1e-5)
        assert torch.isfinite(sk.probs(logits * 30, 0.01)).all()

    def test_no_rows_gives_no_rows(self) -> None:
        assert SinkhornKnopp().probs(torch.empty(0, 8), 0.04).shape == (0, 8)


def test_no_centering_is_plain_sharpening() -> None:
    logits = torch.randn(4, 6)
    assert torch.allclose(NoCentering().probs(logits, 0.1), torch.softmax(logits / 0.1, dim=-1))


def test_build_centering_names_the_option() -> None:
    assert isinstance(build_centering("sinkhorn_knopp", 8, 0.9), SinkhornKnopp)
    assert build_centering("ema", 8, 0.5).momentum == 0.5
    with pytest.raises(ValueError, match="centering"):
        build_centering("softmax", 8, 0.9)


def test_dino_loss_stays_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 8, 64)
    teacher = torch.softmax(torch.randn(2, 8, 64) / 0.04, dim=-1)
    reference = DINOClsLoss(0.1)(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = DINOClsLoss(0.1)(student, teacher)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(reference.item(), rel=1e-6)  # bf16 would be ~1e-3 off


class TestKoLeoLoss:
    def test_hand_computed_value(self) -> None:
        # Unit vectors at 0, 90 and 180 degrees in a plane: each one's nearest neighbour is the
        # 90-degree vector at distance sqrt(2), except that one, whose neighbours are both sqrt(2).
        x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
        assert KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)

    def test_scale_invariant_and_uses_nearest_not_self(self) -> None:
        x = torch.tensor([[3.0, 0.0], [0.0, 0.5], [0.6, 0.8]])
        # normalised: (1,0), (0,1), (0.6,0.8); nearest of (1,0) is (0.6,0.8) at sqrt(0.8)
        d = [math.sqrt(0.8), math.sqrt(0.4), math.sqrt(0.4)]
        expected = -sum(math.log(v) for v in d) / 3
        assert KoLeoLoss()(x).item() == pytest.approx(expected, rel=1e-5)

    def test_gradient_pushes_close_points_apart(self) -> None:
        x = torch.tensor([[1.0, 0.0], [1.0, 0.05], [-1.0, 0.0]], requires_grad=True)
        KoLeoLoss()(x).backward()
        step = x.detach() - 0.1 * x.grad
        assert KoLeoLoss()(step) < KoLeoLoss()(x.detach())
        cos = F.cosine_similarity(step[0], step[1], dim=0)
        assert cos < F.cosine_similarity(x[0].detach(), x[1].detach(), dim=0)

    def test_rejects_a_single_row(self) -> None:
        with pytest.raises(ValueError, match="B >= 2"):
            KoLeoLoss()(torch.ones(1, 4))


class TestSoftCrossEntropy:
    """The chunked cross-entropy both iBOT losses use, against ``log_softmax`` written out."""

    @staticmethod
    def reference(logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
        return -(targets * F.log_softmax(logits.float() / temp, dim=-1)).sum(dim=-1)

    @pytest.mark.parametrize("chunk_elements", [1 << 22, 40])  # one chunk; several, the last one short
    def test_value_and_gradient_match_log_softmax(self, monkeypatch: pytest.MonkeyPatch, chunk_elements: int) -> None:
        monkeypatch.setattr(soft_ce, "CHUNK_ELEMENTS", chunk_elements)
        torch.manual_seed(0)
        logits = torch.randn(7, 16, requires_grad=True)
        targets = torch.softmax(torch.randn(7, 16), dim=-1) * torch.rand(7, 1) * 2
        weights = torch.randn(7)  # a non-uniform upstream gradient
        (soft_ce.soft_cross_entropy(logits, targets, 0.1) * weights).sum().backward()
        grad = logits.grad.clone()
        logits.grad = None
        expected = self.reference(logits, targets, 0.1)
        (expected * weights).sum().backward()
        # targets that do not sum to 1 (the [cls] loss adds teacher views up) are handled exactly
        torch.testing.assert_close(soft_ce.soft_cross_entropy(logits, targets, 0.1), expected)
        torch.testing.assert_close(grad, logits.grad)

    def test_logits_are_not_modified_and_bf16_logits_get_a_bf16_gradient(self) -> None:
        torch.manual_seed(0)
        logits = torch.randn(5, 32).bfloat16().requires_grad_()
        before = logits.detach().clone()
        targets = torch.softmax(torch.randn(5, 32), dim=-1)
        loss = soft_ce.soft_cross_entropy(logits, targets, 0.1)
        loss.sum().backward()
        assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
        assert torch.equal(logits.detach(), before)
        torch.testing.assert_close(loss, self.reference(logits.detach(), targets, 0.1))

    def test_keeps_no_k_wide_fp32_tensor_for_the_backward(self) -> None:
        """What it saves is the bf16 logits and the targets (both alive anyway) plus O(rows)."""
        logits = torch.randn(64, 1024).bfloat16().requires_grad_()
        targets = torch.softmax(torch.randn(64, 1024), dim=-1)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            soft_ce.soft_cross_entropy(logits, targets, 0.1).sum()
        k_wide = [t for t in saved if t.dim() == 2]
        assert {t.data_ptr() for t in k_wide} == {logits.data_ptr(), targets.data_ptr()}
        assert sum(t.numel() for t in saved if t.dim() < 2) <= 2 * 64

    def test_shape_mismatch_names_both_shapes(self) -> None:
        with pytest.raises(ValueError, match=r"\(3, 4\) and \(3, 5\)"):
            soft_ce.soft_cross_entropy(torch.zeros(3, 4), torch.zeros(3, 5), 0.1)
