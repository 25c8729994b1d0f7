"""FSDP2 for the method: both branches sharded over the ranks, and their full state dicts.

Every ViT block, each backbone and each head of the student *and* the teacher is its own
``fully_shard`` unit. The teacher is sharded exactly like the student, so the EMA stays one
shard-local multi-tensor lerp with no communication, and its forward all-gathers one block
at a time like the student's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from ibot.method import IBOT
from ibot.models.vit import MaskedViT


def _reshard(module: FSDPModule, *_: Any) -> None:
    module.reshard()


def shard_method(method: IBOT) -> None:
    """Shard ``method`` in place over the default process group (call before building the optimizer)."""
    for branch in (method.student, method.teacher):
        for module in branch.values():
            if isinstance(module, MaskedViT):
                for block in module.vit.blocks:
                    fully_shard(block)
            fully_shard(module)
    # FSDP frees a root unit's gathered weights in its backward, which the teacher never runs:
    # free them after its forward, so that memory and the EMA see shards.
    for module in method.teacher.values():
        module.register_forward_hook(_reshard)
    method.pair_ema_parameters()


def full_state_dicts(method: IBOT, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on rank 0's CPU (empty elsewhere); every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(method, options=options), get_optimizer_state_dict(method, optimizer, options=options)


def load_full_state_dicts(method: IBOT, optimizer: torch.optim.Optimizer, model: dict, optim: dict) -> None:
    """The inverse of ``full_state_dicts``: every rank reads the full state and keeps its shards."""
    set_model_state_dict(method, model, options=StateDictOptions(full_state_dict=True))
    # Not strict: AdamW has no state yet for the prototypes while they are frozen (first epoch).
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(method, optimizer, optim, options=options)
