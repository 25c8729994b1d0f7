"""The pre-training loop: batches -> loss -> AdamW step -> teacher EMA -> metrics/checkpoints."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from ibot.config import Config, RunPlan, config_from_dict
from ibot.data.collate import Batch
from ibot.data.loaders import build_train_loader
from ibot.data.skips import SkipLog, report_skips
from ibot.errors import ConfigError, NonFiniteLossError
from ibot.eval.monitor import KNNMonitor
from ibot.method import IBOT, LossOutput
from ibot.train.checkpoint import (
    CHECKPOINT_NAME,
    TEACHER_NAME,
    load_checkpoint,
    rng_state,
    save_backbone,
    save_checkpoint,
    set_rng_state,
    sub_state_dict,
)
from ibot.train.distributed import DistEnv, all_reduce_mean, barrier, broadcast_values, init_distributed, shutdown
from ibot.train.metrics import MetricsLogger
from ibot.train.optim import build_optimizer, clip_and_step, set_lr_wd
from ibot.train.runtime import Runtime
from ibot.train.schedules import Schedules, budget_total_steps

logger = logging.getLogger(__name__)


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


class TrainClock:
    """Wall time of training alone: time spent in the k-NN monitor is paused out.

    ``minutes`` starts at ``already`` (the training time of the run before a resume).
    """

    def __init__(self, already: float = 0.0) -> None:
        self._start = time.monotonic() - 60 * already
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
    """Refuse to resume with a different model: the weights would not fit or mean something else."""
    old = config_from_dict(saved)
    if old.model != cfg.model:
        raise ConfigError(f"{path}: checkpoint was trained with a different model config; start a new output_dir")


def train(cfg: Config, resume: bool = False, progress: bool = True) -> RunResult:
    """Pre-train with iBOT for ``optim.epochs`` or ``train.budget_minutes`` (or until ``train.max_minutes``).

    Under torchrun every process runs this; gradients are averaged by DDP, the centers are
    all-reduced, and rank 0 alone writes metrics and checkpoints.
    """
    run = Runtime.resolve(cfg.train)
    env = init_distributed(run.device.type)
    try:
        return _train(cfg, run, env, resume, progress)
    finally:
        shutdown(env)


@dataclass
class _Trainee:
    """What the loop steps: the method (and its DDP wrapper), optimiser and loss scaler."""

    method: IBOT
    model: torch.nn.Module  # ``method`` or DDP(method): forward through this one
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler | None
    clip_sets: list[list[torch.nn.Parameter]]
    sharded: bool  # FSDP: parameters and optimizer state are shards; checkpoints are gathered


def _build(cfg: Config, run: Runtime, env: DistEnv) -> _Trainee:
    method = IBOT(cfg.model, cfg.loss, cfg.data.global_crop_size, cfg.mim).to(run.device)
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


def _resume(t: _Trainee, path: Path, cfg: Config, run: Runtime) -> tuple[int, float]:
    """Load everything from ``path``; returns the step to continue from and the training minutes so far."""
    state = load_checkpoint(path, "cpu" if t.sharded else run.device)
    _check_resume_config(state["config"], cfg, path)
    saved_sharded = state.get("optimizer_keys") == "names"
    if saved_sharded != t.sharded:
        was = "train.parallel=fsdp under torchrun" if saved_sharded else "no FSDP"
        raise ConfigError(f"{path}: checkpoint was written with {was}; resume it the same way")
    if t.sharded:
        from ibot.train.sharding import load_full_state_dicts

        load_full_state_dicts(t.method, t.optimizer, state["method"], state["optimizer"])
    else:
        t.method.load_state_dict(state["method"])
        t.optimizer.load_state_dict(state["optimizer"])
    if t.scaler is not None and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    logger.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), float(state.get("train_minutes", 0.0))


def _save(t: _Trainee, out: Path, step: int, train_minutes: float, cfg: Config, plan: RunPlan, env: DistEnv) -> None:
    """Rank 0 writes the checkpoint and the teacher; under FSDP every rank first helps to gather them."""
    if t.sharded:
        from ibot.train.sharding import full_state_dicts

        method_state, optimizer_state = full_state_dicts(t.method, t.optimizer)
    elif env.is_main:
        method_state, optimizer_state = t.method.state_dict(), t.optimizer.state_dict()
    if not env.is_main:
        return
    state = {
        "method": method_state,
        "optimizer": optimizer_state,
        # FSDP's full optimizer state is keyed by parameter names, a plain one by indices.
        "optimizer_keys": "names" if t.sharded else "indices",
        "scaler": t.scaler.state_dict() if t.scaler is not None else {},
        "step": step,
        "train_minutes": train_minutes,
        "rng": rng_state(),
        "config": cfg.to_dict(),
        "plan": asdict(plan),
    }
    save_checkpoint(out / CHECKPOINT_NAME, state)
    save_backbone(out / TEACHER_NAME, sub_state_dict(method_state, "teacher.backbone."), cfg.to_dict())


def _train_step(
    t: _Trainee, batch: Batch, step: int, schedules: Schedules, run: Runtime, clip_grad: float, monitors: bool
) -> tuple[LossOutput, dict[str, float], torch.Tensor | None]:
    """One optimisation step at ``step``: loss, backward, clip, AdamW, teacher EMA (+ collapse monitors)."""
    values = {
        "lr": schedules.lr(step),
        "weight_decay": schedules.weight_decay(step),
        "teacher_momentum": schedules.teacher_momentum(step),
        "teacher_temp": schedules.teacher_temp(step),
        "koleo_weight": schedules.koleo_weight(step),
    }
    set_lr_wd(t.optimizer, values["lr"], values["weight_decay"])
    with run.autocast():
        out = t.model(batch, values["teacher_temp"], monitors, values["koleo_weight"])
    (t.scaler.scale(out.total) if t.scaler is not None else out.total).backward()
    grad_norm = clip_and_step(t.optimizer, t.scaler, t.clip_sets, clip_grad, schedules.last_layer_frozen(step))
    t.method.update_teacher(values["teacher_momentum"])
    return out, values, grad_norm


def _train(cfg: Config, run: Runtime, env: DistEnv, resume: bool, progress: bool) -> RunResult:
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    trainee = _build(cfg, run, env)
    if trainee.sharded and cfg.eval.monitor_every_minutes > 0:
        # The monitor runs the teacher on rank 0 alone; sharded, every rank must take part.
        raise ConfigError("eval.monitor_every_minutes: the k-NN monitor needs train.parallel=ddp; set it to 0")
    ckpt_path = out / CHECKPOINT_NAME
    step, minutes_before = _resume(trainee, ckpt_path, cfg, run) if resume and ckpt_path.exists() else (0, 0.0)
    loader, dataset = build_train_loader(cfg, env.rank, env.world_size, start_sample=step * cfg.data.batch_size)
    plan = RunPlan.derive(cfg, len(dataset), env.world_size)
    schedules = Schedules(cfg, plan)
    if env.is_main:
        logger.info(
            "%d images, %s, %d process(es), device %s, precision %s, attention %s, residual stream %s",
            len(dataset),
            plan,
            env.world_size,
            run.device,
            run.precision,
            run.attention,
            str(run.residual_dtype or torch.float32).removeprefix("torch."),
        )
    metrics = MetricsLogger(out) if env.is_main else None
    monitor_every = cfg.eval.monitor_every_minutes
    monitor = KNNMonitor(cfg, run) if monitor_every > 0 and env.is_main else None
    knn_top1: float | None = None

    def run_monitor(at_step: int) -> None:
        """k-NN of the teacher on the monitor subset, logged at ``at_step`` (rank 0; others wait)."""
        nonlocal knn_top1
        if monitor is not None and metrics is not None:
            values = clock.pause_during(monitor, trainee.method.teacher["backbone"])
            knn_top1 = values["knn_top1"]
            metrics.log(at_step, {**values, "train_minutes": clock.minutes()})
            logger.info("step %d, %.1f min: k-NN top-1 %.2f %%", at_step, clock.minutes(), knn_top1)
        if monitor_every > 0:
            clock.pause_during(barrier, env)

    skipped = SkipLog(dataset.skips)  # the scan's skips, then decoding's: once per path, not per epoch
    warned: set[tuple[str, str]] = set()
    clock = TrainClock(minutes_before)
    budget = cfg.train.budget_minutes
    next_monitor = monitor_every
    if step == 0:
        run_monitor(0)  # the untrained starting point of the curve
    window_start = time.monotonic()
    window_images, images_per_second, last_loss = 0, 0.0, math.nan
    bar = tqdm(
        total=plan.total_steps,
        initial=step,
        disable=not (progress and env.is_main),
        dynamic_ncols=True,
        desc="pretrain",
    )
    trainee.method.train()
    try:
        for batch in loader:
            if step >= plan.total_steps:
                break
            skipped.extend(batch.skipped if batch is not None else ())
            if batch is None or batch.batch_size == 0:
                continue
            out_loss, values, grad_norm = _train_step(
                trainee,
                batch.to(run.device),
                step,
                schedules,
                run,
                cfg.optim.clip_grad,
                monitors=(step + 1) % cfg.train.log_every == 0,  # the steps whose metrics are logged
            )
            step += 1
            window_images += batch.batch_size * env.world_size
            bar.update(1)
            stop_early = cfg.train.max_steps > 0 and step >= cfg.train.max_steps
            monitor_due = False
            timed = cfg.train.max_minutes > 0 or monitor_every > 0 or budget > 0
            if (timed and step % cfg.train.log_every == 0) or (budget > 0 and step >= plan.total_steps):
                # Rank 0's clock, read at log steps (and at the estimated end of a budget, which
                # moves on if the pace picked up) and sent in one broadcast: every rank stops,
                # waits for the monitor and re-plans the budget at the same step.
                (minutes,) = broadcast_values([clock.minutes()], env)
                stop_early = stop_early or 0 < cfg.train.max_minutes < minutes
                monitor_due = 0 < monitor_every and next_monitor <= minutes
                if budget > 0:
                    plan = replace(plan, total_steps=budget_total_steps(step, minutes, budget))
                    schedules = Schedules(cfg, plan)
                    bar.total = plan.total_steps
            at_end = step >= plan.total_steps
            log_now = step % cfg.train.log_every == 0 or at_end or stop_early
            save_now = step % cfg.train.checkpoint_every == 0 or at_end or stop_early
            if log_now or save_now:
                # The only host sync of the step; it also keeps a non-finite state from being saved.
                last_loss = float(all_reduce_mean(out_loss.total.detach(), env))
                if not math.isfinite(last_loss):
                    raise NonFiniteLossError(
                        f"step {step}: loss is {last_loss}; last good checkpoint kept at {ckpt_path}"
                    )
            if log_now:
                now = time.monotonic()
                images_per_second = window_images / max(now - window_start, 1e-9)
                window_start, window_images = now, 0
                logged = {f"loss_{k}": v for k, v in out_loss.parts.items()} | out_loss.monitors
                # One all-reduce for every loss part and collapse monitor.
                reduced = all_reduce_mean(torch.stack([v.float() for v in logged.values()]), env).tolist()
                values.update(
                    loss=last_loss,
                    **dict(zip(logged, reduced)),
                    epoch=step / plan.steps_per_epoch,
                    images_per_second=images_per_second,
                    train_minutes=clock.minutes(),
                )
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                if metrics is not None:
                    metrics.log(step, values)
                    for key, detail in collapse_warnings(values, cfg.model.out_dim).items():
                        if key not in warned:  # once per branch and kind
                            warned.add(key)
                            logger.warning("step %d: the %s branch looks collapsed (%s): %s", step, *key, detail)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{values['lr']:.2e}", img_s=f"{images_per_second:.1f}")
            if save_now:
                _save(trainee, out, step, clock.minutes(), cfg, plan, env)
                barrier(env)
            if stop_early:
                logger.info("stopped at step %d by train.max_minutes / train.max_steps", step)
            if at_end or stop_early:
                run_monitor(step)
                break
            if monitor_due:
                run_monitor(step)
                next_monitor += monitor_every
                window_start = time.monotonic()  # images/s counts training time only
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if monitor is not None:
        skipped.extend(monitor.skips)
    if env.is_main:
        report_skips(skipped, "pretrain", out / "skipped.tsv", merge=resume)
    return RunResult(out, step, plan.total_steps, images_per_second, last_loss, len(skipped), clock.minutes(), knn_top1)
