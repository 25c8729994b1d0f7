"""ibot.models.fit: the one comparison of keys and shapes, and the loads built on it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ibot.config import Config
from ibot.errors import DataError
from ibot.method import IBOT
from ibot.models.fit import load_fitted, misfit, shapes
from ibot.models.init_weights import InitWeights


def test_misfit_names_each_kind_and_counts_the_rest() -> None:
    expected = shapes({f"k{i}": torch.zeros(2) for i in range(6)} | {"w": torch.zeros(3, 3)})
    assert misfit(expected, {**{f"k{i}": torch.ones(2) for i in range(6)}, "w": torch.ones(3, 3)}) == ""
    state = {"k0": torch.ones(2), "w": torch.ones(3, 4), "extra": torch.ones(1)}
    assert misfit(expected, state) == "missing: k1, k2, k3 (+2 more); unexpected: extra; wrong shape: w"
    assert misfit(expected, state, may_lack=lambda k: k.startswith("k")) == "unexpected: extra; wrong shape: w"


def test_load_fitted_keeps_what_may_lack_and_refuses_in_one_line() -> None:
    module = nn.Linear(3, 2)
    bias = module.bias.detach().clone()
    load_fitted(module, {"weight": torch.ones(2, 3)}, "f.pt", "x", may_lack=lambda k: k == "bias")
    assert torch.equal(module.weight, torch.ones(2, 3)) and torch.equal(module.bias, bias)
    with pytest.raises(DataError) as info:
        load_fitted(module, {"weight": torch.ones(2, 3)}, "f.pt", "does not fit")
    assert str(info.value) == "f.pt: does not fit; missing: bias"


def _init(method: IBOT, drop: str) -> InitWeights:
    state = {k: v.clone() for k, v in method.student.state_dict().items() if not k.startswith(drop)}
    return InitWeights("src.pt", "test", state, dict(state))


def test_init_from_may_lack_heads_and_mask_token_but_no_block(tiny_config: Config) -> None:
    torch.manual_seed(0)
    source = IBOT(tiny_config.model, tiny_config.loss, 16)
    target = IBOT(tiny_config.model, tiny_config.loss, 16)
    heads = {k: v.clone() for k, v in target.student.state_dict().items() if not k.startswith("backbone.")}
    init = _init(source, drop="backbone.mask_token")
    init = InitWeights(
        "src.pt",
        "test",
        {k: v for k, v in init.student.items() if k.startswith("backbone.")},
        {k: v for k, v in init.teacher.items() if k.startswith("backbone.")},
    )
    init.load_into(target.student, target.teacher)
    for branch in (target.student, target.teacher):
        state = branch.state_dict()
        assert torch.equal(state["backbone.vit.cls_token"], source.student.state_dict()["backbone.vit.cls_token"])
        assert all(torch.equal(state[k], v) for k, v in heads.items())  # fresh heads stay as built
    with pytest.raises(DataError, match=r"^src\.pt: model\.init_from does not fit .*missing: backbone\.vit\.blocks"):
        _init(source, drop="backbone.vit.blocks.0.").load_into(target.student, target.teacher)
