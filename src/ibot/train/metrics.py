"""Metric sinks: one JSON object per line in ``metrics.jsonl`` plus TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends ``{"step": s, ...}`` lines; TensorBoard is optional (skipped if not installed).

    Lines of steps after ``after_step`` (written by a killed run after its last checkpoint) and
    a line cut short by the kill are dropped first, so a resumed run's curve has each step once.
    """

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, after_step: int = 0) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
                self._writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=after_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if step > 0 and isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
