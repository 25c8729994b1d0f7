"""A step-time jump that the data wait does not explain: another process competing for the cores.

The loop hands ``PaceWatch.observe`` each log window's images/s and data-wait share (the run's
first window left out: it holds the start-up). When two windows in a row take ``JUMP`` times
the seconds per step of the run's earlier windows and their data-wait share did not grow by
``WAIT_GROWTH``, the step itself slowed down: on a CPU, most often another process took a core
that one of the intra-op threads needs at every barrier. Losing one of two cores costs up to 2x;
with spinning OpenMP waits (an environment that set OMP_WAIT_POLICY=ACTIVE, or torch loaded
before ``ibot.cli.main`` could set PASSIVE) it cost 3-8x (docs/input.md). Two windows, not one:
a checkpoint written after a log line stretches one window alone.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

JUMP = 2.0  # seconds per step against the earlier windows' median
WAIT_GROWTH = 0.1  # a data-wait share this much above the earlier windows' explains the jump
BASELINE_WINDOWS = 50  # the earlier windows compared against: the most recent ones


@dataclass(frozen=True)
class PaceJump:
    """The windows that jumped: how much slower per step than before, and their data-wait share."""

    ratio: float
    seconds_per_image_before: float
    seconds_per_image_now: float
    wait_share: float

    def message(self, device: str, threads: int) -> str:
        """The warning, with what to try on ``device`` (``train.threads`` now ``threads``; 0 = torch's default)."""
        head = (
            f"steps take {self.ratio:.1f}x longer than before while the data wait did not grow "
            f"({100 * self.wait_share:.0f} % of the time): "
        )
        if device != "cpu":
            return head + f"another process may be competing for the {device} device or the CPU cores"
        advice = "try train.threads=1" if threads != 1 else "free a CPU core for it"
        return head + f"another process may be competing for the CPU cores; {advice}"


@dataclass
class PaceWatch:
    """The run's judged log windows (seconds per image, data-wait share); reports the first jump once."""

    earlier: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=BASELINE_WINDOWS))
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=2))
    reported: bool = False

    def observe(self, images_per_second: float, wait_share: float) -> PaceJump | None:
        """Add a window; the jump the first time the last two windows are slow for no input reason."""
        if self.reported or images_per_second <= 0:
            return None
        if len(self.recent) == self.recent.maxlen:
            self.earlier.append(self.recent[0])
        self.recent.append((1 / images_per_second, wait_share))
        if not self.earlier or len(self.recent) < self.recent.maxlen:
            return None
        before = statistics.median(pace for pace, _ in self.earlier)
        wait_before = statistics.median(share for _, share in self.earlier)
        slow = all(pace >= JUMP * before for pace, _ in self.recent)
        waited_more = any(share > wait_before + WAIT_GROWTH for _, share in self.recent)
        if not slow or waited_more:
            return None
        self.reported = True
        now = min(pace for pace, _ in self.recent)
        return PaceJump(now / before, before, now, max(share for _, share in self.recent))
