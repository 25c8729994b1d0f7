"""When the pre-training loop logs, saves, runs the k-NN monitor and stops: a pure function of step and time.

The loop asks ``Cadence.reads_clock`` whether this step needs rank 0's clock (it is read and
broadcast only then, so every rank takes the same decision without a sync at other steps; under
a budget, at every step), then ``Cadence.after_step`` for what to do now. ``DecodeWatch`` tells
when batches without a decodable image have spanned a whole epoch. Nothing here reads a clock,
a file or a signal.
"""

from __future__ import annotations

from dataclasses import dataclass

from ibot.config import Config

# Why a run stops, in the order they win when several hold at the same step.
END, SIGNAL, MAX_STEPS, MAX_MINUTES = "end", "signal", "max_steps", "max_minutes"


@dataclass(frozen=True)
class Actions:
    """What the loop does after a step. ``stop`` is "" (go on) or why it stops (``END``, ``SIGNAL``, ...)."""

    log: bool = False
    save: bool = False
    monitor: bool = False
    stop: str = ""


@dataclass(frozen=True)
class Cadence:
    """``train.log_every`` / ``checkpoint_every`` / ``max_steps`` / ``max_minutes`` / ``budget_minutes`` and
    ``eval.monitor_every_minutes`` / ``monitor_every_steps`` turned into decisions."""

    log_every: int
    checkpoint_every: int
    max_steps: int = 0
    max_minutes: float = 0.0
    budget_minutes: float = 0.0
    monitor_every_minutes: float = 0.0
    monitor_every_steps: int = 0

    @staticmethod
    def from_config(cfg: Config) -> Cadence:
        t = cfg.train
        return Cadence(
            t.log_every,
            t.checkpoint_every,
            t.max_steps,
            t.max_minutes,
            t.budget_minutes,
            cfg.eval.monitor_every_minutes,
            cfg.eval.monitor_every_steps,
        )

    def finished(self, step: int, total_steps: int) -> bool:
        """Whether a run at ``step`` (e.g. resumed from its last checkpoint) has no step left to train."""
        return step >= total_steps or 0 < self.max_steps <= step

    def reads_clock(self, step: int, total_steps: int) -> bool:
        """Whether ``after_step`` needs the training minutes at ``step``: log steps of a timed run, and every
        step of a budget. A budget estimated at log steps alone overshoots: a short one is spent before
        the first log step, and a pace that drops after an estimate is seen only at the next one."""
        timed = self.max_minutes > 0 or self.monitor_every_minutes > 0
        return self.budget_minutes > 0 or (timed and step % self.log_every == 0)

    def after_step(
        self, step: int, total_steps: int, minutes: float | None, monitors_done: int, signalled: bool
    ) -> Actions:
        """What to do once ``step`` steps are done.

        ``minutes``: training minutes when ``reads_clock`` said so, else None. ``monitors_done``: k-NN
        monitor calls since the start (the one at step 0 not counted). ``signalled``: every rank agreed
        a stop was asked for (SIGTERM, SIGINT, SLURM's warning).
        """
        stop = self._stop_reason(step, total_steps, minutes, signalled)
        every, every_steps = self.monitor_every_minutes, self.monitor_every_steps
        monitor_due = every > 0 and minutes is not None and minutes >= (monitors_done + 1) * every
        monitor_due = monitor_due or (every_steps > 0 and step % every_steps == 0)
        return Actions(
            log=bool(stop) or step % self.log_every == 0,
            save=bool(stop) or step % self.checkpoint_every == 0,
            # A stop for a signal saves at once: the grace time before a kill is short.
            monitor=(monitor_due or bool(stop)) and (every > 0 or every_steps > 0) and stop != SIGNAL,
            stop=stop,
        )

    def _stop_reason(self, step: int, total_steps: int, minutes: float | None, signalled: bool) -> str:
        if step >= total_steps:
            return END
        if signalled:
            return SIGNAL
        if 0 < self.max_steps <= step:
            return MAX_STEPS
        if minutes is not None and 0 < self.max_minutes < minutes:
            return MAX_MINUTES
        return ""


@dataclass
class DecodeWatch:
    """Whether a whole epoch of the sampler went by without one image that decoded.

    ``position`` counts the samples this rank has drawn (``batch_size`` per batch, from the
    sample the run started at); an epoch is ``per_rank`` samples, from a multiple of it. A stretch
    of batches without a decoded image (on any rank) that spans such an epoch proves that no
    image of it decodes; stretches that do not are only bad luck.
    """

    per_rank: int
    batch_size: int
    position: int = 0
    since: int = -1  # where the stretch without a decoded image began (-1: at ``position``)

    def __post_init__(self) -> None:
        if self.since < 0:
            self.since = self.position

    def batch(self, decoded: bool) -> bool:
        """Count one batch; True once the stretch without a decoded image holds a whole epoch."""
        self.position += self.batch_size
        if decoded:
            self.since = self.position
            return False
        first_epoch = -(-self.since // self.per_rank) * self.per_rank  # the first epoch start in the stretch
        return first_epoch + self.per_rank <= self.position
