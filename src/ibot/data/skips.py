"""Files a command could not use: why each was skipped, one summary line, the full list as TSV.

Skips come from two places: the folder scan (links, loops, odd directories) and decoding
(empty, truncated, not an image, too many pixels). Both end up in one ``SkipLog`` per
command, deduplicated by path, so an image that fails in every epoch is counted once.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger(__name__)

# The reasons, as they appear in summary lines and in the second column of the TSV.
DANGLING_LINK = "dangling link"
IMAGE_NAMED_DIR = "directory named like an image"
VISITED = "symlink loop or folder already visited"
UNREADABLE_DIR = "unreadable folder"
UNREADABLE = "unreadable or truncated"
EMPTY = "empty file"
NOT_AN_IMAGE = "not an image"
TOO_MANY_PIXELS = "too many pixels"
UNSUPPORTED_FORMAT = "format the installed Pillow cannot decode"
CHANNELS = "channels differ from data.channels"
VOLUME = "3-D volume, not a 2-D image"
AMBIGUOUS_SHAPE = "ambiguous array shape"
NOT_FINITE = "NaN or inf in the pixels"
NO_PIXEL_DATA = "no pixel data"

TSV_HEADER = "path\treason"


class Skip(NamedTuple):
    """A file (or folder) left out, and why: one of the reason constants above."""

    path: str
    reason: str


class SkipLog:
    """Skips by path, in the order first seen; adding a path again keeps its first reason."""

    def __init__(self, skips: Iterable[Skip] = ()) -> None:
        self._by_path: dict[str, str] = {}
        self.extend(skips)

    def add(self, skip: Skip) -> None:
        self._by_path.setdefault(skip.path, skip.reason)

    def extend(self, skips: Iterable[Skip]) -> None:
        for skip in skips:
            self.add(skip)

    def __len__(self) -> int:
        return len(self._by_path)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (Skip(p, r) for p, r in self._by_path.items())

    def sorted(self) -> list[Skip]:
        """By path: a stable order whatever order the loader workers met the files in."""
        return sorted(self)

    def counts(self) -> dict[str, int]:
        """{reason: number of paths}, most frequent first."""
        return dict(Counter(self._by_path.values()).most_common())

    def summary(self, what: str, listed_in: str | Path | None = None) -> str:
        """One line: ``pretrain: skipped 5 files (3 empty file, 2 not an image), e.g. a, b, c; list in X``."""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts().items())
        first = ", ".join(s.path for s in self.sorted()[:3])
        more = ", ..." if len(self) > 3 else ""
        where = f"; list in {listed_in}" if listed_in else ""
        return f"{what}: skipped {len(self)} files ({reasons}), e.g. {first}{more}{where}"

    def as_counts(self) -> dict:
        """What a result JSON keeps: the total and the count per reason."""
        return {"skipped_images": len(self), "skipped_by_reason": self.counts()}


def write_tsv(log: SkipLog, path: str | Path) -> Path:
    """``path<TAB>reason`` per line under a header, sorted by path (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [TSV_HEADER, *(f"{_one_line(s.path)}\t{s.reason}" for s in log.sorted())]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a killed run's leftover is removed at the next start
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def read_tsv(path: str | Path) -> list[Skip]:
    """The skips of a TSV written by ``write_tsv`` ([] when there is none)."""
    try:
        lines = Path(path).read_text().splitlines()[1:]
    except OSError:
        return []
    return [Skip(*line.rsplit("\t", 1)) for line in lines if "\t" in line]


def report_skips(log: SkipLog, what: str, tsv: str | Path, merge: bool = False) -> None:
    """Log the one summary line and write the full list to ``tsv``; remove a stale list when none.

    With ``merge`` (a resumed run) the list already at ``tsv`` is kept and added to ``log``.
    """
    tsv = Path(tsv)
    if merge:
        log.extend(read_tsv(tsv))
    if not len(log):
        tsv.unlink(missing_ok=True)  # a list from an earlier run would describe other files
        return
    write_tsv(log, tsv)
    logger.warning(log.summary(what, tsv))


def _one_line(path: str) -> str:
    """A file name may hold a tab or a newline; the TSV must not break on it."""
    return path.replace("\t", "\\t").replace("\n", "\\n")
