"""The pre-training loop: batches -> loss -> AdamW step -> teacher EMA -> metrics/checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

import torch
import yaml
from tqdm import tqdm

from ibot.config import Config, RunPlan, config_from_dict
from ibot.data.collate import Batch
from ibot.data.loaders import build_train_loader, listed_images
from ibot.data.pipeline import build_pipeline
from ibot.data.skips import SkipLog, report_skips
from ibot.data.stats import resolve_auto_stats
from ibot.distill_method import Distill
from ibot.errors import CheckpointWriteError, ConfigError, DataError, IBOTError, NonFiniteLossError
from ibot.method import IBOT, LossOutput
from ibot.models.cnn_student import check_crops, cnn_name
from ibot.models.init_weights import InitWeights, read_init_weights
from ibot.run_folder import RunFolder, RunFolderLocked
from ibot.runtime import Runtime
from ibot.storage import remove_debris, save_backbone, sub_state_dict
from ibot.tracking import Trackers, require_trackers
from ibot.train.backbone_freeze import freeze_backbone_steps, freeze_line, skip_backbone_backward
from ibot.train.cadence import END, SIGNAL, Actions, Cadence, DecodeWatch
from ibot.train.checkpoint import CheckpointStore, rng_state, set_rng_state
from ibot.train.distributed import (
    DistEnv,
    all_reduce_mean,
    any_rank,
    any_ranks,
    barrier,
    broadcast_values,
    init_distributed,
    shutdown,
)
from ibot.train.metrics import MetricsLogger
from ibot.train.optim import build_optimizer, clip_and_step, set_lr_wd, upgrade_optimizer_state
from ibot.train.pace import PaceWatch
from ibot.train.schedules import Schedules, budget_total_steps
from ibot.train.signals import StopRequests

logger = logging.getLogger(__name__)

# A logged window whose data-wait share reaches this warns (once) that the run is input-bound:
# at a fifth, a loader that kept up would make the run 1 / (1 - 0.2) = 1.25x faster, more
# than the spread of the share itself (checkpoint writes and log syncs stretch some windows).
INPUT_BOUND_SHARE = 0.2
INPUT_BOUND = ("data", "input-bound")  # its key in ``_Session.warned``


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    step: int
    total_steps: int
    images_per_second: float
    last_loss: float
    skipped_images: int
    train_minutes: float  # wall time of the training steps, k-NN monitor excluded
    knn_top1: float | None  # last k-NN monitor value (None without the monitor)
    stopped_by: str = ""  # the signal that stopped the run early ("SIGTERM"), "" otherwise
    skipped_steps: int = 0  # steps whose loss was not finite and whose update was skipped
    already_finished: bool = False  # a resume of a run with nothing left to train: no step taken
    decoded_images: int = 0  # distinct files decoded by this call (every rank's), of ``listed_images``
    listed_images: int = 0  # the files data.path lists (some may not decode)


class TrainClock:
    """Wall time of training alone: time spent in the k-NN monitor is paused out.

    ``minutes`` starts at ``already`` (the training time of the run before a resume).
    """

    def __init__(self, already: float = 0.0) -> None:
        self._already = already
        self.start()

    def start(self) -> None:
        """Count from now (plus ``already``): what came before, e.g. building the monitor, is not training."""
        self._start = time.monotonic() - 60 * self._already
        self._paused = 0.0

    def minutes(self) -> float:
        return (time.monotonic() - self._start - self._paused) / 60

    def pause_during(self, fn, *args):  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._paused += time.monotonic() - t0


def collapse_warnings(values: dict[str, float], num_prototypes: int) -> dict[tuple[str, str], str]:
    """{(branch, kind): message} for branches whose teacher targets look collapsed (``collapse_monitors``)."""
    uniform = 0.98 * math.log(num_prototypes)
    found = {}
    for branch in ("cls", "patch"):
        entropy = values.get(f"{branch}_teacher_entropy", 0.0)
        perplexity = values.get(f"{branch}_perplexity", math.inf)
        if entropy > uniform:
            found[branch, "uniform"] = f"teacher entropy {entropy:.2f}, ln K = {math.log(num_prototypes):.2f}"
        if 0 < perplexity < 2:
            found[branch, "one prototype"] = f"batch perplexity {perplexity:.2f}"
    return found


def _check_resume_config(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse to resume with a different model (the weights would not fit or mean something else), or
    with other data or batch size unless ``train.resume_allow_changes`` names the key."""
    old = config_from_dict(saved)
    # model.init_from only chose the starting weights: the checkpoint's weights rule now.
    if replace(old.model, init_from="") != replace(cfg.model, init_from=""):
        raise ConfigError(f"{path}: checkpoint was trained with a different model config; start a new output_dir")
    if bool(old.distill.teacher) != bool(cfg.distill.teacher):  # a student without its teacher, or the reverse
        was = "ibot distill (distill.teacher set)" if old.distill.teacher else "ibot pretrain (no distill.teacher)"
        raise ConfigError(f"{path}: checkpoint was written by {was}; resume it the same way")
    changes = {
        "data.path": (old.data.path, cfg.data.path, _same_path(old.data.path, cfg.data.path)),
        "data.batch_size": (old.data.batch_size, cfg.data.batch_size, old.data.batch_size == cfg.data.batch_size),
    }
    for key, (before, now, same) in changes.items():
        if not same and key not in cfg.train.resume_allow_changes:
            raise ConfigError(
                f"{key}: {path} was trained with {before}, this resume has {now}; resume with the same "
                f"{key}, or allow the change with train.resume_allow_changes=[{key}]"
            )


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))


def _check_resume_plan(state: dict, cfg: Config, world_size: int, path: Path) -> None:
    """Refuse to resume with another number of processes (the sample stream and the schedules are
    cut for it: always), or over a folder that lists another number of images than the checkpoint's
    run did (unless ``train.resume_allow_changes`` allows data.path)."""
    plan = state.get("plan") or {}
    saved_batch = config_from_dict(state["config"]).data.batch_size
    global_batch = int(plan.get("global_batch_size", saved_batch))
    was = int(plan.get("world_size", global_batch // saved_batch))  # checkpoints before the field: derived
    if was != world_size:
        raise ConfigError(
            f"{path}: checkpoint was written by {was} process(es), this resume runs {world_size}; "
            f"resume it with {was} (or start a new output_dir)"
        )
    if "data.path" in cfg.train.resume_allow_changes or not plan:
        return
    listed = listed_images(cfg.data)
    before = int(plan.get("dataset_size", 0))
    if before:
        changed, what = listed != before, f"lists {listed} images, {before} when"
    else:  # a checkpoint from before the field: its steps per epoch tell
        steps, steps_before = max(1, listed // global_batch), plan["steps_per_epoch"]
        changed, what = steps != steps_before, f"gives {steps} steps per epoch, {steps_before} when"
    if changed:
        raise ConfigError(
            f"data.path: {cfg.data.path} {what} {path} was written: the dataset changed; resume over the same "
            "images, or allow the change with train.resume_allow_changes=[data.path]"
        )


Resume = bool | Literal["auto"]


class Monitor(Protocol):
    """Scores the teacher's backbone during the run (``eval.monitor_every_minutes``), e.g. a k-NN
    monitor: ``monitor(backbone)`` -> metrics; ``skips``: the files it could not read."""

    skips: SkipLog

    def __call__(self, backbone: torch.nn.Module) -> dict[str, float]: ...


MonitorFactory = Callable[[Config, Runtime], Monitor]


def train(
    cfg: Config, resume: Resume = False, progress: bool = True, monitor: MonitorFactory | None = None
) -> RunResult:
    """Pre-train with iBOT for ``optim.epochs`` or ``train.budget_minutes`` (or until ``train.max_minutes``).

    ``resume``: True continues from the newest checkpoint in ``train.output_dir`` (an error if
    there is none); "auto" continues when there is one (submitit's requeues); False starts a new
    run (an error if the folder holds checkpoints of another). A worker that torchrun restarts
    (``--max-restarts``) resumes "auto". Under torchrun every process runs this; gradients are
    averaged by DDP, the centers are all-reduced, and rank 0 alone writes metrics and checkpoints.
    ``monitor`` builds rank 0's monitor when ``eval.monitor_every_minutes`` or ``_steps`` > 0 (the caller chooses
    it: ``ibot.eval.monitor.KNNMonitor``, so that training does not depend on evaluation).
    """
    if cfg.eval.monitoring and monitor is None:
        raise ConfigError(
            "eval.monitor_every_minutes / monitor_every_steps > 0, but this caller of train() gave no monitor; set 0"
        )
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"
    require_trackers(cfg.train)  # a tracker's missing extra: one line, before the folder is written
    run = Runtime.resolve(cfg.train)
    env = init_distributed(run.device.type)
    try:
        with _run_folder_lock(RunFolder(Path(cfg.train.output_dir)), env):
            return _train(cfg, run, env, resume, progress, monitor)
    finally:
        shutdown(env)


@contextlib.contextmanager
def _run_folder_lock(folder: RunFolder, env: DistEnv) -> Iterator[None]:
    """Rank 0 holds the run folder's lock for the whole run, taken before anything is written; when
    another process holds it, every rank stops (rank 0 with the line naming the holder)."""
    with contextlib.ExitStack() as stack:
        if env.is_main:
            try:
                stack.enter_context(folder.lock("ibot pretrain"))
            except IBOTError:
                broadcast_values([1.0], env)  # the other ranks stop with it
                raise
        (failed,) = broadcast_values([0.0], env)
        if failed:
            raise RunFolderLocked(f"{folder.root}: rank 0 could not lock the run folder (see its log)")
        yield


@dataclass
class _Trainee:
    """What the loop steps: the method (and its DDP wrapper), optimiser and loss scaler."""

    method: IBOT | Distill
    model: torch.nn.Module  # ``method`` or DDP(method): forward through this one
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler | None
    clip_sets: list[list[torch.nn.Parameter]]
    sharded: bool  # FSDP: parameters and optimizer state are shards; checkpoints are gathered


def _read_init(cfg: Config, store: CheckpointStore, resume: Resume, env: DistEnv) -> InitWeights | None:
    """``model.init_from`` read and fitted to the config, or None: not set, or a run that resumes
    (its checkpoint rules). Called before the run folder is written, so a misfit writes nothing."""
    if not cfg.model.init_from:
        return None
    if resume and (resume is True or store.paths()):
        if env.is_main:
            logger.info("model.init_from ignored: the run resumes from its checkpoint")
        return None
    init = read_init_weights(cfg.model.init_from, cfg.model, cfg.data.global_crop_size, cfg.data.channels)
    if env.is_main:
        logger.info("%s", init.summary())
        if init.fresh_heads:
            logger.info("model.init_from: fresh projection heads: %s", init.fresh_heads)
    return init


def _build(cfg: Config, run: Runtime, env: DistEnv, init: InitWeights | None = None) -> _Trainee:
    if cfg.distill.teacher:  # ibot distill: a frozen teacher read from its file
        method: IBOT | Distill = Distill.from_config(cfg)
    else:
        cnn = cnn_name(cfg.distill.student)
        method = IBOT(cfg.model, cfg.loss, cfg.data.global_crop_size, cfg.mim, cfg.data.channels, cnn)
        if cnn:
            check_crops(method.student["backbone"], cfg)
    if env.is_main and (line := method.start_line()):
        logger.info("%s", line)
    if init is not None:  # before sharding and wrapping: they take the weights as they find them
        method.start_from(init)
    method = method.to(run.device)
    method.use_runtime(run)
    method.set_activation_checkpointing(cfg.train.activation_checkpointing)
    if cfg.train.compile:
        method.compile_backbones()
    model: torch.nn.Module = method
    sharded = env.enabled and cfg.train.parallel == "fsdp"
    if sharded:
        from ibot.train.sharding import shard_method

        shard_method(method)  # gradients are reduce-scattered in backward: no wrapper to forward through
    elif env.enabled:
        # DDP averages student gradients; the teacher has no trainable parameters and the centers
        # are all-reduced by the losses themselves, so buffers are not broadcast.
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(method, device_ids=device_ids, broadcast_buffers=False)
    return _Trainee(
        method=method,
        model=model,
        optimizer=build_optimizer(method, cfg.optim, run.device),
        scaler=torch.amp.GradScaler("cuda") if run.use_scaler else None,
        clip_sets=[list(m.parameters()) for m in method.student.values()],
        sharded=sharded,
    )


def _start(
    t: _Trainee, store: CheckpointStore, cfg: Config, run: Runtime, env: DistEnv, resume: Resume
) -> tuple[int, float, dict | None]:
    """Load the newest checkpoint when resuming; returns the step to continue from, the training minutes
    so far and the checkpoint's plan (None: a new run)."""
    found = store.load_newest("cpu" if t.sharded else run.device, set_aside=env.is_main) if resume else None
    if found is None:
        if resume is True:
            raise DataError(f"{store.folder}: no checkpoint to resume from; start without --resume")
        if not resume and store.paths():
            raise ConfigError(
                f"train.output_dir: {store.folder} holds checkpoints of an earlier run; "
                "continue it with --resume or choose another folder"
            )
        return 0, 0.0, None
    state, path = found
    _check_resume_config(state["config"], cfg, path)
    _check_resume_plan(state, cfg, env.world_size, path)
    saved_sharded = state.get("optimizer_keys") == "names"
    if saved_sharded != t.sharded:
        was = "train.parallel=fsdp under torchrun" if saved_sharded else "no FSDP"
        raise ConfigError(f"{path}: checkpoint was written with {was}; resume it the same way")
    if t.sharded:
        from ibot.train.sharding import load_full_state_dicts

        optimizer_state = upgrade_optimizer_state(state["optimizer"], t.method)
        load_full_state_dicts(t.method, t.optimizer, state["method"], optimizer_state)
    else:
        t.method.load_state_dict(state["method"])
        t.optimizer.load_state_dict(upgrade_optimizer_state(state["optimizer"], t.method))
    if t.scaler is not None and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if env.is_main:
        logger.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), float(state.get("train_minutes", 0.0)), state.get("plan") or {}


def _save(
    t: _Trainee, store: CheckpointStore, step: int, minutes: float, cfg: Config, plan: RunPlan, env: DistEnv
) -> None:
    """Rank 0 writes the checkpoint and the teacher (under FSDP every rank first helps to gather them);
    every rank raises ``CheckpointWriteError`` if that failed."""
    if t.sharded:
        from ibot.train.sharding import full_state_dicts

        method_state, optimizer_state = full_state_dicts(t.method, t.optimizer)
    elif env.is_main:
        method_state, optimizer_state = t.method.state_dict(), t.optimizer.state_dict()
    error = ""
    if env.is_main:
        state = {
            "method": method_state,
            "optimizer": optimizer_state,
            # FSDP's full optimizer state is keyed by parameter names, a plain one by indices.
            "optimizer_keys": "names" if t.sharded else "indices",
            "scaler": t.scaler.state_dict() if t.scaler is not None else {},
            "step": step,
            "train_minutes": minutes,
            "rng": rng_state(),
            "config": cfg.to_dict(),
            "plan": asdict(plan),
        }
        try:
            store.save(state, step)
            evaluated = sub_state_dict(method_state, f"{t.method.evaluated}.backbone.")  # the run's model
            save_backbone(RunFolder(store.folder).teacher, evaluated, cfg.to_dict(), step)
        except CheckpointWriteError as exc:
            error = str(exc)
    (failed,) = broadcast_values([float(bool(error))], env)  # also the barrier after the write
    if failed:
        raise CheckpointWriteError(error or f"step {step}: rank 0 could not write the checkpoint (see its log)")


def _train_step(
    t: _Trainee, batch: Batch, step: int, schedules: Schedules, run: Runtime, cfg: Config, env: DistEnv, monitors: bool
) -> tuple[LossOutput, dict[str, float], torch.Tensor | None, bool]:
    """One optimisation step at ``step``: loss, backward, clip, AdamW, teacher EMA (+ collapse monitors).

    With ``train.skip_nonfinite_steps`` the loss is checked at every step (a host sync) and a
    non-finite one skips the update; returns (loss, schedule values, grad norm, whether skipped).
    """
    values = {
        "lr": schedules.lr(step),
        "weight_decay": schedules.weight_decay(step),
        "teacher_momentum": schedules.teacher_momentum(step),
        "teacher_temp": schedules.teacher_temp(step),
        "koleo_weight": schedules.koleo_weight(step),
        "backbone_lr": schedules.backbone_lr(step),
    }
    set_lr_wd(t.optimizer, values["lr"], values["weight_decay"], values["backbone_lr"])
    backbone_frozen = schedules.backbone_frozen(step)
    if t.model is t.method and not t.sharded:  # DDP / FSDP: the gradients are dropped in clip_and_step
        skip_backbone_backward(t.optimizer, backbone_frozen)
    with run.autocast():
        out = t.model(batch, values["teacher_temp"], monitors, values["koleo_weight"])
    (t.scaler.scale(out.total) if t.scaler is not None else out.total).backward()
    if cfg.train.skip_nonfinite_steps > 0 and not math.isfinite(float(all_reduce_mean(out.total.detach(), env))):
        t.optimizer.zero_grad(set_to_none=True)  # every rank saw the same mean: all skip together
        return out, values, None, True
    last_layer_frozen = schedules.last_layer_frozen(step)
    grad_norm = clip_and_step(
        t.optimizer, t.scaler, t.clip_sets, cfg.optim.clip_grad, last_layer_frozen, backbone_frozen
    )
    t.method.update_teacher(values["teacher_momentum"], backbone=not backbone_frozen)
    return out, values, grad_norm, False


class _Window:
    """Images/s and the data-wait share over the steps since the last log line (monitor time left out).

    The data-wait share is the part of the window's wall time the loop spent blocked in the
    loader's ``next()``. On CUDA the host runs ahead of the device, so part of a wait may
    overlap queued device work: the share bounds the device's input-starved time from above.
    """

    def __init__(self) -> None:
        self.closed = 0  # windows measured so far by this process
        self.restart()

    def restart(self) -> None:
        self.start, self.images, self.waited = time.monotonic(), 0, 0.0

    def timed(self, batches: Iterable[Batch | None]) -> Iterator[Batch | None]:
        """``batches``, adding the time each ``next()`` blocks to ``waited``."""
        it = iter(batches)
        while True:
            t0 = time.monotonic()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.waited += time.monotonic() - t0
            yield batch

    def close(self) -> tuple[float, float]:
        """(images/s, data-wait share) of the window, and a new window from now."""
        seconds = max(time.monotonic() - self.start, 1e-9)
        measured = self.images / seconds, self.waited / seconds  # the waits lie inside the window: <= 1
        self.closed += 1
        self.restart()
        return measured


@dataclass
class _Session:
    """One process's run: what the loop steps, where it writes, and where it is (``step``, ``plan``)."""

    cfg: Config
    run: Runtime
    env: DistEnv
    trainee: _Trainee
    store: CheckpointStore
    loader: Iterable[Batch | None]
    plan: RunPlan
    schedules: Schedules
    cadence: Cadence
    step: int
    clock: TrainClock
    metrics: MetricsLogger | None  # rank 0 only
    monitor: Monitor | None  # rank 0 only, with eval.monitor_every_minutes
    bar: tqdm
    skipped_images: SkipLog  # the scan's skips, then decoding's: once per path, not per epoch
    augment: Callable[[Batch], Batch]  # the pipeline's device step (data.pipeline=pil: the identity)
    window: _Window = field(default_factory=_Window)
    warned: set[tuple[str, str]] = field(default_factory=set)
    saved_step: int = -1  # the step of the newest checkpoint this process wrote or resumed from
    decoded: torch.Tensor | None = None  # (dataset size,) bool: the files decoded since the start
    # What the run result reports.
    skipped_steps: int = 0
    monitors_done: int = 0
    last_loss: float = math.nan
    images_per_second: float = 0.0
    knn_top1: float | None = None
    pace: PaceWatch = field(default_factory=PaceWatch)  # step-time jumps the data wait does not explain

    def read_clock(self) -> float | None:
        """Rank 0's training minutes, broadcast, at the steps the cadence needs them (a budget is re-planned then)."""
        if not self.cadence.reads_clock(self.step, self.plan.total_steps):
            return None
        (minutes,) = broadcast_values([self.clock.minutes()], self.env)
        self.replan(minutes)
        return minutes

    def replan(self, minutes: float) -> None:
        """Under ``train.budget_minutes``: the steps that fill the budget at the pace so far."""
        budget = self.cfg.train.budget_minutes
        if budget > 0 and self.step > 0 and minutes > 0:
            self.plan = replace(self.plan, total_steps=budget_total_steps(self.step, minutes, budget))
            self.schedules = Schedules(self.cfg, self.plan)
            self.bar.total = self.plan.total_steps

    def finished_before(self) -> bool:
        """A resumed run with nothing left to train: its steps done, ``train.max_steps`` reached or its budget spent."""
        if self.step == 0:
            return False
        (minutes,) = broadcast_values([self.clock.minutes()], self.env)
        self.replan(minutes)
        return self.cadence.finished(self.step, self.plan.total_steps)

    def open_folder(self, resumed: bool = False) -> None:
        """Rank 0 writes the run folder (``config.yaml``, a killed run's debris removed) and opens its
        metrics: after every refusal, and only for a run with a step to train, so a refused run or a
        finished one resumed leaves the folder as it was. ``resumed``: the trackers continue their runs."""
        if self.env.is_main:
            folder = RunFolder(self.store.folder)
            _write_run_folder(folder, self.cfg)
            # A resumed run drops the metric lines a killed run wrote after its last checkpoint.
            self.metrics = MetricsLogger(
                self.store.folder,
                tensorboard="tensorboard" in self.cfg.train.loggers,
                after_step=self.step,
                trackers=Trackers.open(folder, self.cfg, resumed),
            )

    def count_decoded(self, batch: Batch) -> None:
        if batch.indices is not None and self.plan.dataset_size:
            if self.decoded is None:
                self.decoded = torch.zeros(self.plan.dataset_size, dtype=torch.bool)
            self.decoded[batch.indices] = True

    def decoded_images(self) -> int:
        """Distinct files decoded since the start, on every rank (a collective: every rank calls it)."""
        seen = self.decoded if self.decoded is not None else torch.zeros(self.plan.dataset_size, dtype=torch.bool)
        if self.env.enabled:  # each rank decoded its own share of the files
            seen = all_reduce_mean(seen.to(self.run.device, torch.float32), self.env) > 0
        return int(seen.sum())

    def no_image_decoded(self, resumed: bool) -> DataError:
        """The error of a run over a folder where a whole epoch decoded nothing; the skip list written first."""
        tsv = RunFolder(self.store.folder).skipped
        if self.env.is_main:
            report_skips(self.skipped_images, "pretrain", tsv, merge=resumed)
        return DataError(
            f"no image in {self.cfg.data.path} decoded: {len(self.skipped_images)} files skipped, see {tsv}"
        )

    def count_skipped_step(self) -> None:
        limit = self.cfg.train.skip_nonfinite_steps
        self.skipped_steps += 1
        logger.warning(
            "step %d: non-finite loss, update skipped (%d of train.skip_nonfinite_steps=%d)",
            self.step,
            self.skipped_steps,
            limit,
        )
        if self.skipped_steps > limit:
            raise NonFiniteLossError(
                f"step {self.step}: more than train.skip_nonfinite_steps={limit} non-finite losses; "
                f"last good checkpoint kept in {self.store.folder}"
            )

    def check_loss(self, out_loss: LossOutput, skipped: bool) -> None:
        """The only host sync of a step (at log and save steps); it also keeps a non-finite state from being saved."""
        self.last_loss = float(all_reduce_mean(out_loss.total.detach(), self.env))
        if not math.isfinite(self.last_loss) and not skipped:
            raise NonFiniteLossError(
                f"step {self.step}: loss is {self.last_loss}; last good checkpoint kept in {self.store.folder}"
            )

    def log(self, out_loss: LossOutput, values: dict[str, float], grad_norm: torch.Tensor | None) -> None:
        """Loss parts, collapse monitors (one all-reduce for all), schedules and pace to the metrics and the bar."""
        logged = {f"loss_{k}": v for k, v in out_loss.parts.items()} | out_loss.monitors
        self.images_per_second, wait_share = self.window.close()
        # The ranks' mean share rides on the loss parts' all-reduce: no sync of its own.
        logged["data_wait_share"] = torch.tensor(wait_share, device=self.run.device)
        reduced = all_reduce_mean(torch.stack([v.float() for v in logged.values()]), self.env).tolist()
        row = {**values, **dict(zip(logged, reduced))}
        row.update(
            loss=self.last_loss,
            epoch=self.step / self.plan.steps_per_epoch,
            images_per_second=self.images_per_second,
            train_minutes=self.clock.minutes(),
            skipped_steps=self.skipped_steps,
        )
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if self.metrics is not None:
            self.metrics.log(self.step, row)
            for key, detail in collapse_warnings(row, self.cfg.model.out_dim).items():
                if key not in self.warned:  # once per branch and kind
                    self.warned.add(key)
                    logger.warning("step %d: the %s branch looks collapsed (%s): %s", self.step, *key, detail)
            self.warn_input_bound(row["data_wait_share"])
            jump = self.pace.observe(self.images_per_second, row["data_wait_share"]) if self.window.closed > 1 else None
            if jump is not None:
                logger.warning("step %d: %s", self.step, jump.message(self.run.device.type, self.cfg.train.threads))
        self.bar.set_postfix(
            loss=f"{self.last_loss:.3f}",
            lr=f"{row['lr']:.2e}",
            img_s=f"{self.images_per_second:.1f}",
            wait=f"{row['data_wait_share']:.0%}",
            # ibot distill: the teacher's and the student's forward on the logged step
            **{
                k.removeprefix("distill_"): f"{row[k]:.0f}"
                for k in ("distill_teacher_ms", "distill_student_ms")
                if k in row
            },
        )

    def warn_input_bound(self, share: float) -> None:
        """Once per run: the loader cannot keep up. The first window is left out (it holds the workers' start)."""
        if self.window.closed < 2 or share < INPUT_BOUND_SHARE or INPUT_BOUND in self.warned:
            return
        self.warned.add(INPUT_BOUND)
        device = self.cfg.data.pipeline == "device"
        logger.warning(
            "step %d: input-bound: the loop waited for the next batch %.0f %% of the time since the last "
            "log line; give the loader more workers (data.num_workers=%d now, CPU cores permitting)%s",
            self.step,
            100 * share,
            self.cfg.data.num_workers,
            "" if device else " or move the augmentation onto the accelerator (data.pipeline=device)",
        )

    def save(self) -> None:
        _save(self.trainee, self.store, self.step, self.clock.minutes(), self.cfg, self.plan, self.env)
        self.saved_step = self.step

    def run_monitor(self) -> None:
        """k-NN of the run's model (the teacher; distill: the student) on the monitor subset, logged at
        this step (rank 0; the others wait)."""
        if self.monitor is not None and self.metrics is not None:
            method = self.trainee.method
            values = self.clock.pause_during(self.monitor, getattr(method, method.evaluated)["backbone"])
            self.knn_top1 = values["knn_top1"]
            self.metrics.log(self.step, {**values, "train_minutes": self.clock.minutes()})
            logger.info("step %d, %.1f min: k-NN top-1 %.2f %%", self.step, self.clock.minutes(), self.knn_top1)
        self.clock.pause_during(barrier, self.env)
        self.window.restart()  # images/s counts training time only

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()

    def result(self, stopped_by: str, resumed: bool, already_finished: bool = False) -> RunResult:
        if self.monitor is not None:
            self.skipped_images.extend(self.monitor.skips)
        decoded = self.decoded_images()
        if self.env.is_main and not already_finished:  # a finished run read no image: its list stands
            report_skips(self.skipped_images, "pretrain", RunFolder(self.store.folder).skipped, merge=resumed)
            logger.info("decoded %d of the %d listed image files", decoded, self.plan.dataset_size)
        return RunResult(
            self.store.folder,
            self.step,
            self.plan.total_steps,
            self.images_per_second,
            self.last_loss,
            len(self.skipped_images),
            self.clock.minutes(),
            self.knn_top1,
            stopped_by,
            self.skipped_steps,
            already_finished,
            decoded,
            self.plan.dataset_size,
        )


def _refuse_earlier_run(folder: RunFolder) -> None:
    """A new run (no --resume) refuses a folder holding any file of a run: it would overwrite them."""
    if folder.holds_run():
        raise ConfigError(
            f"train.output_dir: {folder.root} holds {folder.describe_run()}; "
            "continue it with --resume or choose another folder"
        )


def _measured_stats(cfg: Config, folder: RunFolder, resume: Resume) -> Config:
    """``cfg`` with ``data.mean`` / ``data.std`` = auto replaced by numbers: those the resumed run
    measured (its ``config.yaml``), so a resume normalises as before, or measured now."""
    if not cfg.data.auto_stats:
        return cfg
    if resume and folder.config.is_file():
        saved = config_from_dict(yaml.safe_load(folder.config.read_text())).data
        if not saved.auto_stats:
            return replace(cfg, data=replace(cfg.data, mean=cfg.data.mean or saved.mean, std=cfg.data.std or saved.std))
    return replace(cfg, data=resolve_auto_stats(cfg.data, cfg.train.seed))


def _write_run_folder(folder: RunFolder, cfg: Config) -> None:
    """The run folder, cleaned of a killed run's temporary files, and its ``config.yaml``."""
    folder.root.mkdir(parents=True, exist_ok=True)
    remove_debris(folder.root)
    folder.config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _open_session(
    cfg: Config, run: Runtime, env: DistEnv, resume: Resume, progress: bool, monitor: MonitorFactory | None
) -> _Session:
    """Seeds, model, resumed state, data, plan; then the run folder. Every refusal (a folder holding
    another run, ``model.init_from``, the checkpoint to resume, the data) comes before the first
    write, so a refused run leaves the folder as it found it (``config.yaml`` included)."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    store = CheckpointStore(cfg.train.output_dir, cfg.train.keep_checkpoints)
    if not resume:
        _refuse_earlier_run(RunFolder(store.folder))
    cfg = _measured_stats(cfg, RunFolder(store.folder), resume)
    init = _read_init(cfg, store, resume, env)
    trainee = _build(cfg, run, env, init)
    use_monitor = cfg.eval.monitoring
    if trainee.sharded and use_monitor:
        # The monitor runs the teacher on rank 0 alone; sharded, every rank must take part.
        raise ConfigError("eval.monitor_every_minutes: the k-NN monitor needs train.parallel=ddp; set it to 0")
    step, minutes_before, resumed_plan = _start(trainee, store, cfg, run, env, resume)
    pipeline = build_pipeline(cfg.data)
    loader, dataset = build_train_loader(cfg, env.rank, env.world_size, step * cfg.data.batch_size, pipeline)
    plan = RunPlan.derive(cfg, len(dataset), env.world_size)
    fresh_heads = init is not None and bool(init.fresh_heads)
    frozen = freeze_backbone_steps(cfg.optim, plan, fresh_heads, resumed_plan)
    plan = replace(plan, freeze_backbone_steps=frozen)
    if env.is_main:
        logger.info(
            "%d image files listed in %s (each decoded when drawn), %s, %d process(es), "
            "device %s, precision %s, attention %s, residual stream %s",
            len(dataset),
            cfg.data.path,
            plan,
            env.world_size,
            run.device,
            run.precision,
            run.attention,
            str(run.residual_dtype or torch.float32).removeprefix("torch."),
        )
        if line := freeze_line(cfg.optim, frozen, fresh_heads, step):
            logger.info("%s", line)
    shown = progress and env.is_main
    return _Session(
        cfg,
        run,
        env,
        trainee,
        store,
        loader,
        plan,
        Schedules(cfg, plan),
        Cadence.from_config(cfg),
        step,
        TrainClock(minutes_before),
        metrics=None,  # opened with the folder (``open_folder``) once there is a step to train
        monitor=monitor(cfg, run) if monitor is not None and use_monitor and env.is_main else None,
        bar=tqdm(total=plan.total_steps, initial=step, disable=not shown, dynamic_ncols=True, desc="pretrain"),
        skipped_images=SkipLog(dataset.skips),
        augment=pipeline.device_step,
    )


def _train(
    cfg: Config, run: Runtime, env: DistEnv, resume: Resume, progress: bool, monitor: MonitorFactory | None
) -> RunResult:
    s = _open_session(cfg, run, env, resume, progress, monitor)
    s.clock.start()  # building the session (the monitor's images included) is not training time
    if s.step > 0:
        s.saved_step = s.step  # the checkpoint it resumed from
    if s.finished_before():
        s.close()
        return s.result("", resumed=True, already_finished=True)
    s.open_folder(resumed=bool(resume))
    if s.step == 0 and cfg.eval.monitoring:
        s.run_monitor()  # the untrained starting point of the curve
    act = Actions()
    per_rank = max(1, s.plan.dataset_size // env.world_size)  # the sampler's epoch on each rank
    watch = DecodeWatch(per_rank, cfg.data.batch_size, position=s.step * cfg.data.batch_size)
    s.trainee.method.train()
    with StopRequests() as requests:
        try:
            for batch in s.window.timed(s.loader):  # the loader's waits go into the data-wait share
                images = batch.batch_size if batch is not None else 0
                s.skipped_images.extend(batch.skipped if batch is not None else ())
                # Every rank steps or none does (DDP); a stop request is seen on batches without images too.
                asked, skip, decoded = any_ranks([bool(requests.signum), images == 0, images > 0], env)
                if watch.batch(decoded) and not asked:
                    raise s.no_image_decoded(resumed=bool(resume))
                if skip:
                    if asked:
                        act = Actions(save=s.saved_step != s.step, stop=SIGNAL)
                        if act.save:
                            s.save()
                        break
                    continue
                s.count_decoded(batch)
                log_monitors = (s.step + 1) % cfg.train.log_every == 0  # the steps whose metrics are logged
                out_loss, values, grad_norm, skipped = _train_step(
                    s.trainee, s.augment(batch.to(run.device)), s.step, s.schedules, run, cfg, env, log_monitors
                )
                s.step += 1
                s.window.images += batch.batch_size * env.world_size
                s.bar.update(1)
                if skipped:
                    s.count_skipped_step()
                minutes = s.read_clock()
                signalled = any_rank(bool(requests.signum), env)  # every rank stops at the same step
                act = s.cadence.after_step(s.step, s.plan.total_steps, minutes, s.monitors_done, signalled)
                if act.log or act.save:
                    s.check_loss(out_loss, skipped)
                if act.log:
                    s.log(out_loss, values, grad_norm)
                if act.save:
                    s.save()
                if act.monitor:
                    s.run_monitor()
                    s.monitors_done += 1
                if act.stop:
                    break
        finally:
            s.close()
    stopped_by = requests.name if act.stop == SIGNAL else ""
    if act.stop not in ("", END) and env.is_main:
        logger.info("stopped at step %d by %s", s.step, stopped_by or f"train.{act.stop}")
    if stopped_by:
        requests.hand_on()  # submitit requeues the job from here; it resumes from this checkpoint
    return s.result(stopped_by, resumed=bool(resume))
