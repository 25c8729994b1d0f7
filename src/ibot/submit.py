"""SLURM submission through submitit: one task per GPU, the process group from the job's environment.

The job trains with ``resume="auto"``: when SLURM preempts it or its time runs out, submitit
requeues it and it continues from the last checkpoint of ``train.output_dir``. ``local=True``
runs the same job script as processes of this machine (submitit's local executor), to try a
submission without a cluster.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ibot.config import Config, config_from_dict
from ibot.errors import ConfigError
from ibot.run_folder import RunFolder


@dataclass(frozen=True)
class SlurmConfig:
    """Resources of one submission (the names of submitit's ``update_parameters``)."""

    nodes: int = 1
    tasks_per_node: int = 1  # processes per node: one per GPU
    gpus_per_node: int = 0
    cpus_per_task: int = 10
    mem_gb: int = 0  # 0: SLURM's default
    timeout_min: int = 60 * 24
    partition: str = ""
    name: str = "ibot"

    def __post_init__(self) -> None:
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')}: must be >= 1")


class PretrainJob:
    """The callable submitit pickles and runs in every task (a ``Checkpointable``: requeued on timeout)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def __call__(self) -> Any:
        import submitit

        from ibot.eval.monitor import KNNMonitor
        from ibot.train.loop import train

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        job = submitit.JobEnvironment()
        # torch.distributed's env:// rendezvous, on the first node of the allocation.
        os.environ.update(
            RANK=str(job.global_rank),
            WORLD_SIZE=str(job.num_tasks),
            LOCAL_RANK=str(job.local_rank),
            MASTER_ADDR="127.0.0.1" if job.num_nodes == 1 else job.hostnames[0],
            MASTER_PORT=str(20000 + int(str(job.job_id).split("_")[0]) % 20000),
        )
        return train(config_from_dict(self.config), resume="auto", progress=False, monitor=KNNMonitor)

    def checkpoint(self) -> Any:
        """Called by submitit before a requeue: the same job, which resumes from its checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(PretrainJob(self.config))


def submit(cfg: Config, slurm: SlurmConfig, folder: str | Path | None = None, local: bool = False) -> Any:
    """Submit ``cfg``'s pre-training; returns the submitit job (``job.result()`` waits for rank 0's)."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("ibot submit needs submitit: pip install 'ibot[slurm]'") from None
    folder = Path(folder) if folder else RunFolder(Path(cfg.train.output_dir)).slurm
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else None)
    params: dict[str, Any] = {
        "name": slurm.name,
        "nodes": slurm.nodes,
        "tasks_per_node": slurm.tasks_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "timeout_min": slurm.timeout_min,
    }
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    if not local:
        params["slurm_signal_delay_s"] = 120  # time to write a checkpoint before the requeue
        if slurm.partition:
            params["slurm_partition"] = slurm.partition
        if slurm.mem_gb:
            params["mem_gb"] = slurm.mem_gb
    elif slurm.nodes != 1:
        raise ConfigError("--nodes: a local submission runs on this machine alone (1 node)")
    executor.update_parameters(**params)
    return executor.submit(PretrainJob(cfg.to_dict()))
