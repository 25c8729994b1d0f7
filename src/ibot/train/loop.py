"""The pre-training loop: batches -> loss -> AdamW step -> teacher EMA -> metrics/checkpoints."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from ibot.config import Config, RunPlan, config_from_dict
from ibot.data.loaders import build_train_loader
from ibot.errors import ConfigError, NonFiniteLossError
from ibot.method import IBOT
from ibot.train.checkpoint import (
    CHECKPOINT_NAME,
    TEACHER_NAME,
    load_checkpoint,
    rng_state,
    save_backbone,
    save_checkpoint,
    set_rng_state,
)
from ibot.train.distributed import DistEnv, all_reduce_mean, barrier, init_distributed, shutdown
from ibot.train.metrics import MetricsLogger
from ibot.train.optim import build_optimizer, clip_and_step, set_lr_wd
from ibot.train.runtime import Runtime
from ibot.train.schedules import Schedules

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    step: int
    total_steps: int
    images_per_second: float
    last_loss: float
    skipped_images: int


def _check_resume_config(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse to resume with a different model: the weights would not fit or mean something else."""
    old = config_from_dict(saved)
    if old.model != cfg.model:
        raise ConfigError(f"{path}: checkpoint was trained with a different model config; start a new output_dir")


def train(cfg: Config, resume: bool = False, progress: bool = True) -> RunResult:
    """Pre-train with iBOT until ``optim.epochs`` or ``train.max_minutes``; returns a summary.

    Under torchrun every process runs this; gradients are averaged by DDP, the centers are
    all-reduced, and rank 0 alone writes metrics and checkpoints.
    """
    run = Runtime.resolve(cfg.train)
    env = init_distributed(run.device.type)
    try:
        return _train(cfg, run, env, resume, progress)
    finally:
        shutdown(env)


def _train(cfg: Config, run: Runtime, env: DistEnv, resume: bool, progress: bool) -> RunResult:
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    method = IBOT(cfg.model, cfg.loss, cfg.data.global_crop_size).to(run.device)
    method.set_attention(run.attention)
    # DDP averages student gradients; the teacher has no trainable parameters and the centers
    # are all-reduced by the losses themselves, so buffers are not broadcast.
    model = (
        torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[run.device.index] if run.device.type == "cuda" else None, broadcast_buffers=False
        )
        if env.enabled
        else method
    )
    optimizer = build_optimizer(method, cfg.optim, run.device)
    scaler = torch.amp.GradScaler("cuda") if run.use_scaler else None
    clip_sets = [list(m.parameters()) for m in method.student.values()]

    step = 0
    ckpt_path = out / CHECKPOINT_NAME
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, run.device)
        _check_resume_config(state["config"], cfg, ckpt_path)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d", ckpt_path, step)

    loader, dataset = build_train_loader(cfg, env.rank, env.world_size, start_sample=step * cfg.data.batch_size)
    plan = RunPlan.derive(cfg, len(dataset), env.world_size)
    schedules = Schedules(cfg, plan)
    if env.is_main:
        logger.info(
            "%d images, %s, %d process(es), device %s, precision %s, attention %s",
            len(dataset), plan, env.world_size, run.device, run.precision, run.attention,
        )
    metrics = MetricsLogger(out) if env.is_main else None

    def checkpoint(at_step: int) -> None:
        if not env.is_main:
            return
        state = {
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "step": at_step,
            "rng": rng_state(),
            "config": cfg.to_dict(),
            "plan": asdict(plan),
        }
        save_checkpoint(ckpt_path, state)
        save_backbone(out / TEACHER_NAME, method.teacher["backbone"].state_dict(), cfg.to_dict())

    skipped: list[str] = []
    start_time = time.monotonic()
    window_start, window_images = time.monotonic(), 0
    images_per_second, last_loss = 0.0, math.nan
    bar = tqdm(
        total=plan.total_steps, initial=step, disable=not (progress and env.is_main), dynamic_ncols=True, desc="pretrain"
    )
    method.train()
    try:
        for batch in loader:
            if step >= plan.total_steps:
                break
            if batch is None or batch.batch_size == 0:
                skipped.extend(batch.skipped if batch is not None else ())
                continue
            skipped.extend(batch.skipped)
            batch = batch.to(run.device)
            lr, wd = schedules.lr(step), schedules.weight_decay(step)
            set_lr_wd(optimizer, lr, wd)
            with run.autocast():
                out_loss = model(batch, teacher_temp=schedules.teacher_temp(step))
            if scaler is not None:
                scaler.scale(out_loss.total).backward()
            else:
                out_loss.total.backward()
            grad_norm = clip_and_step(
                optimizer, scaler, clip_sets, cfg.optim.clip_grad, schedules.last_layer_frozen(step)
            )
            momentum = schedules.teacher_momentum(step)
            method.update_teacher(momentum)
            step += 1
            window_images += batch.batch_size * env.world_size
            bar.update(1)

            at_end = step >= plan.total_steps
            stop_early = (cfg.train.max_minutes > 0 and time.monotonic() - start_time > cfg.train.max_minutes * 60) or (
                cfg.train.max_steps > 0 and step >= cfg.train.max_steps
            )
            if step % cfg.train.log_every == 0 or at_end or stop_early:
                # The only host syncs of the step: every log_every steps.
                last_loss = float(all_reduce_mean(out_loss.total.detach(), env))
                if not math.isfinite(last_loss):
                    raise NonFiniteLossError(
                        f"step {step}: loss is {last_loss}; last good checkpoint kept at {ckpt_path}"
                    )
                now = time.monotonic()
                images_per_second = window_images / max(now - window_start, 1e-9)
                window_start, window_images = now, 0
                values = {
                    "loss": last_loss,
                    **{f"loss_{k}": float(all_reduce_mean(v, env)) for k, v in out_loss.parts.items()},
                    "lr": lr,
                    "weight_decay": wd,
                    "teacher_momentum": momentum,
                    "teacher_temp": schedules.teacher_temp(step - 1),
                    "epoch": step / plan.steps_per_epoch,
                    "images_per_second": images_per_second,
                    "elapsed_s": now - start_time,
                }
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                if metrics is not None:
                    metrics.log(step, values)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.1f}")
            if step % cfg.train.checkpoint_every == 0 or at_end or stop_early:
                if not math.isfinite(float(all_reduce_mean(out_loss.total.detach(), env))):
                    raise NonFiniteLossError(f"step {step}: non-finite loss; last good checkpoint kept at {ckpt_path}")
                checkpoint(step)
                barrier(env)
            if stop_early:
                logger.info("stopped at step %d by train.max_minutes / train.max_steps", step)
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if skipped:
        logger.warning("skipped %d unreadable images, e.g. %s", len(skipped), skipped[0])
    return RunResult(out, step, plan.total_steps, images_per_second, last_loss, len(skipped))
