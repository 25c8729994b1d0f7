"""Fitting weights to modules built from a config: what ``ibot.models.reader`` read becomes a module.

The one comparison of keys and shapes (``misfit``) and the one load (``load_fitted``), so every
consumer refuses a misfit in the same one line naming the file; and the modules the consumers get:
the run's model as its config describes it (``run_backbone``: a ViT or a CNN student), frozen for
evaluation, export and pictures (``frozen_backbone``), and the frozen
tokenizer branch of ``mim.target=frozen`` (``tokenizer_branch``). ``model.init_from``'s own fitting
(layouts, resampled position embeddings, adapted input channels, heads) is
``ibot.models.init_weights``; it compares through ``misfit`` and loads through ``load_fitted``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import nn

from ibot.config import Config
from ibot.errors import DataError
from ibot.models.cnn_student import TimmCNN, cnn_name
from ibot.models.reader import TOKENIZER, read
from ibot.models.vit import MaskedViT
from ibot.storage import sub_state_dict

Tensors = dict[str, torch.Tensor]
Shapes = Mapping[str, torch.Size]


def _never(key: str) -> bool:
    return False


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state.items()}


def misfit(expected: Shapes, state: Mapping[str, torch.Tensor], may_lack: Callable[[str], bool] = _never) -> str:
    """ "" when ``state`` holds every key of ``expected`` (but those ``may_lack``), no other, each of
    the expected shape; else what differs, a few keys of each kind."""
    problems = []
    for label, keys in (
        ("missing", sorted(k for k in expected.keys() - state.keys() if not may_lack(k))),
        ("unexpected", sorted(state.keys() - expected.keys())),
        ("wrong shape", sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k])),
    ):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    return "; ".join(problems)


def load_fitted(
    module: nn.Module, state: Tensors, source: str, what: str, may_lack: Callable[[str], bool] = _never
) -> None:
    """``state`` into ``module`` (keys ``may_lack`` lets it lack stay as built), or one line:
    ``SOURCE: WHAT; missing: ...; unexpected: ...; wrong shape: ...``."""
    problem = misfit(shapes(module.state_dict()), state, may_lack)
    if problem:
        raise DataError(f"{source}: {what}; {problem}")
    module.load_state_dict(state, strict=False)


def run_backbone(cfg: Config, drop_path_rate: float | None = None) -> MaskedViT | TimmCNN:
    """The run's model as its config describes it: ``distill.student=timm:NAME``'s CNN, else the ViT
    of ``cfg.model``, for ``cfg.data``'s crop size and channels (``drop_path_rate``: the config's)."""
    model = cfg.model if drop_path_rate is None else replace(cfg.model, drop_path_rate=drop_path_rate)
    if name := cnn_name(cfg.distill.student):
        return TimmCNN(name, model.patch_size, cfg.data.channels, model.drop_path_rate)
    return MaskedViT.from_config(model, cfg.data.global_crop_size, cfg.data.channels)


def frozen_backbone(
    cfg: Config, tensors: Tensors | None, source: str = "", seed: int = 0, drop_path_rate: float = 0.0
) -> MaskedViT | TimmCNN:
    """``cfg.model``'s backbone for ``cfg.data``'s crop size and channels, holding ``tensors`` (read
    from ``source``), in eval mode without gradients.

    ``tensors`` None: the same architecture from seed ``seed``, untrained (the random-init
    baseline). ``drop_path_rate`` is for fine-tuning.
    """
    torch.manual_seed(seed)
    backbone = run_backbone(cfg, drop_path_rate)
    if tensors is not None:
        load_fitted(backbone, tensors, source, "weights do not fit the architecture in their config")
    return backbone.eval().requires_grad_(False)


def tokenizer_branch(branch: nn.ModuleDict, path: str) -> nn.ModuleDict:
    """``branch`` (built like the run's teacher) holding the teacher of an earlier run's checkpoint
    (``mim.tokenizer_path``): backbone and patch head, which only a full checkpoint holds."""
    if not path:
        raise DataError("mim.tokenizer_path: the 'frozen' target needs an earlier run's folder or checkpoint.pt")
    held = read(path, TOKENIZER)
    if not isinstance(held.loaded, dict) or "method" not in held.loaded:
        raise DataError(f"{held.path}: not an ibot pre-training checkpoint (no 'method' entry)")
    weights = sub_state_dict(held.loaded["method"], "teacher.")
    load_fitted(branch, weights, str(held.path), "its teacher does not fit model.* of this run")
    return branch
