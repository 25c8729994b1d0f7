"""torchrun entry for the worker-restart test: rank 1 of the first attempt SIGKILLs itself before step KILL_AT.

Run as ``torchrun ... tests/kill_worker.py KILL_AT pretrain --config ...``; later attempts
(``TORCHELASTIC_RESTART_COUNT`` > 0) train normally, so the job must resume from a checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys

import ibot.train.loop as loop
from ibot.cli import main

kill_at = int(sys.argv[1])
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
if first_attempt and os.environ.get("RANK") == "1":
    step_once = loop._train_step

    def _train_step(t, batch, step, *args, **kwargs):  # type: ignore[no-untyped-def]
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step_once(t, batch, step, *args, **kwargs)

    loop._train_step = _train_step
sys.exit(main(sys.argv[2:]))
