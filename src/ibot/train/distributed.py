"""Process groups for torchrun: DDP over gloo (CPU) or NCCL (GPU); a no-op for one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run; ``owns_group`` when it created the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group that torchrun (or SLURM via submitit) describes in the environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world_size)
        owns = True
    return DistEnv(rank, world_size, local_rank, owns)


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if not env.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / env.world_size


def broadcast_values(values: list[float], env: DistEnv) -> list[float]:
    """Rank 0's ``values`` on every rank, in one message (decisions taken on one clock, together)."""
    if not env.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is True on any (a stop request that some ranks received)."""
    if not env.enabled:
        return flag
    tensor = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def any_ranks(flags: list[bool], env: DistEnv) -> list[bool]:
    """``any_rank`` of several flags in one message."""
    if not env.enabled:
        return flags
    tensor = torch.tensor([float(f) for f in flags], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
