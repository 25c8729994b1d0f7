"""Stop requests from outside (pre-emption, Ctrl-C, SLURM's warning): finish the step, save, exit 0.

``StopRequests`` installs handlers for SIGTERM, SIGINT and SIGUSR2 (submitit's warning signal
before a SLURM time-out or pre-emption) while the loop runs. The first signal only sets a flag
that the loop reads after each step; every rank agrees on it before the checkpoint is written.
A second signal exits at once. Handlers that were installed before (submitit's requeue) are
called after the checkpoint is written, so a requeue resumes from it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR2", None)) if s is not None)
# Ctrl-C reaches every process of the group and torchrun forwards it as SIGTERM a moment later:
# a repeat this soon after the first is the same request, not an impatient second one.
_SAME_REQUEST_SECONDS = 1.0


class StopRequests:
    """Context manager; ``signum`` is the first signal received (0: none)."""

    def __init__(self) -> None:
        self.signum = 0
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self._first_at = signum, now
            logger.warning(
                "%s received: finishing this step and writing a checkpoint (send it again to exit at once)",
                signal.Signals(signum).name,
            )
        elif now - self._first_at > _SAME_REQUEST_SECONDS:
            print(f"ibot: {signal.Signals(signum).name} again: exiting without a checkpoint", file=sys.stderr)
            os._exit(128 + signum)

    def hand_on(self) -> None:
        """Call the handler that was installed before ours for the received signal (submitit's requeue)."""
        previous = self._previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)
