"""Metric sinks: one JSON object per line in ``metrics.jsonl`` plus TensorBoard scalars.

A run killed mid-write leaves a partial last line. The reader skips it with a warning (the
rows before it are whole), and the logger drops it before it appends, so a resumed run does
not glue its first row onto the fragment. Any other line that is no JSON object is damage,
not a kill: the reader refuses it with a one-line ``DataError`` naming the file and line,
rather than silently plot a run with rows missing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ibot.errors import DataError
from ibot.run_folder import RunFolder
from ibot.tracking import Trackers

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Appends ``{"step": s, ...}`` lines; TensorBoard is optional (skipped if not installed).

    With ``after_step``, lines of later steps (written by a killed run after its last checkpoint)
    and lines cut short by a kill are dropped first, so a resumed run's curve has each step once.
    """

    def __init__(
        self,
        output_dir: str | Path,
        tensorboard: bool = True,
        after_step: int | None = None,
        trackers: Trackers | None = None,
    ) -> None:
        run = RunFolder(Path(output_dir))
        self.trackers = trackers  # MLflow / W&B: after the file, so a failing tracker loses nothing here
        self.path = run.metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if after_step is None:
            _drop_partial_last_line(self.path)
        else:
            _truncate_after(self.path, after_step)
        self._file = self.path.open("a")
        self._writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                # purge_step hides the events a killed run logged after its checkpoint.
                self._writer = SummaryWriter(str(run.tensorboard), purge_step=after_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
        if self.trackers is not None:
            self.trackers.log(step, values)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self.trackers is not None:
            self.trackers.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep the whole rows of steps 1..``step`` (none for a new run: ``step`` 0)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        row = _parse_row(line)  # None: a line cut short by a kill
        if step > 0 and row is not None and row.get("step", 0) <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


def _drop_partial_last_line(path: Path) -> None:
    """End the file on a whole line, so appends start on a new one: a last line without its
    newline is completed when it is a whole row, else cut (a write cut short by a kill)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1  # 0 when the fragment is the whole file
    if _parse_row(data[keep:].decode(errors="replace")) is not None:
        with path.open("ab") as f:
            f.write(b"\n")
        return
    logger.warning("%s: dropped a partial last line (a killed run?): %r", path, data[keep:][:80])
    with path.open("r+b") as f:
        f.truncate(keep)


def _parse_row(line: str) -> dict[str, Any] | None:
    """One line as a JSON object, or None when it is not one."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl``; an unparseable last line is skipped with a warning (see above)."""
    path = Path(path)
    text = path.read_text(errors="replace")
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        row = _parse_row(line)
        if row is not None:
            rows.append(row)
        elif i == len(lines) - 1:
            logger.warning("%s line %d: skipped a partial last line (a killed run?)", path, number)
        else:
            raise DataError(f"{path} line {number}: not a JSON object; the file is damaged, not just cut short")
    return rows
