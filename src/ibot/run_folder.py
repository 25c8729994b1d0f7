"""A run folder: where each of its files lives, whether it holds a run, and who may write it now.

``RunFolder`` is the one place that names the layout: every command asks it for a path instead
of joining a literal. ``lock`` is the folder's advisory lock (``fcntl.flock`` on ``.ibot.lock``):
pre-training and every command that writes into the folder hold it, so a second writer stops at
once with one line naming the holder. The OS drops the lock when its process dies, so a killed
run (``kill -9`` included) never leaves a stale one behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ibot.errors import DataError, IBOTError
from ibot.storage import CHECKPOINT_NAME, TEACHER_NAME, step_checkpoints

LOCK_NAME = ".ibot.lock"
EVAL_DIR = "eval"
ATTENTION_POOL = "attention_pool"  # eval/attention_pool[-random-init].png of ``ibot eval probe``

# Folders this process holds the lock of (resolved path -> depth): a command that holds a
# folder's lock may call another that takes it too (``ibot demo`` -> pre-training).
_HELD: dict[Path, int] = {}


class RunFolderLocked(IBOTError):
    """Another process holds the run folder's lock: it is writing there now."""


@dataclass(frozen=True)
class RunFolder:
    """The files of one pre-training run folder (also: the folder of a foreign weights file, where
    evaluations keep their results)."""

    root: Path

    @classmethod
    def of(cls, weights: str | Path) -> RunFolder:
        """The run folder ``weights`` names, or the folder of a weights file."""
        path = Path(weights)
        return cls(path if path.is_dir() else path.parent)

    # --- what pre-training writes ----------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def teacher(self) -> Path:
        return self.root / TEACHER_NAME

    # --- experiment trackers (ibot.tracking, train.loggers) ----------------------------------------
    @property
    def trackers(self) -> Path:
        """``trackers.json``: each tracker's run id and the last step sent to it (a resume continues)."""
        return self.root / "trackers.json"

    @property
    def mlflow_db(self) -> Path:
        """The default MLflow store (``train.mlflow_uri`` empty): ``sqlite:///RUN/mlflow.db``."""
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        """The artefacts of the default MLflow store."""
        return self.root / "mlflow-artifacts"

    @property
    def wandb(self) -> Path:
        """W&B's folder (``wandb.init(dir=RUN)``): offline runs are ``wandb/offline-run-*``."""
        return self.root / "wandb"

    @property
    def checkpoint_link(self) -> Path:
        """``checkpoint.pt``: a link to the newest step checkpoint (a plain file in older runs)."""
        return self.root / CHECKPOINT_NAME

    def step_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of the step checkpoints, newest first."""
        return step_checkpoints(self.root)

    @property
    def slurm(self) -> Path:
        """``ibot submit``'s default folder of submitit's logs and pickles."""
        return self.root / "slurm"

    @property
    def skipped(self) -> Path:
        """The files pre-training could not read."""
        return self.root / "skipped.tsv"

    # --- what the other commands write -----------------------------------------------------------
    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL_DIR

    def eval_result(self, command: str, random_init: bool) -> Path:
        """Where ``ibot eval <command>`` keeps its result: ``eval/<command>[-random-init].json``."""
        return self.eval_dir / f"{command}{'-random-init' if random_init else ''}.json"

    def eval_skips(self, command: str, random_init: bool) -> Path:
        """``eval/skipped-<command>[-random-init].tsv``: next to the command's result."""
        result = self.eval_result(command, random_init)
        return result.with_name(f"skipped-{result.stem}.tsv")

    def attention_pool(self, random_init: bool) -> Path:
        """The attention-pooling picture of ``ibot eval probe``."""
        return self.eval_dir / f"{ATTENTION_POOL}{'-random-init' if random_init else ''}.png"

    @property
    def features(self) -> Path:
        """The default feature cache of the evaluations and ``ibot retrieve``."""
        return self.root / "features"

    @property
    def pictures(self) -> Path:
        return self.root / "pictures"

    def picture(self, kind: str) -> Path:
        """``pictures/<kind>.png`` of ``ibot visualize <kind>``."""
        return self.pictures / f"{kind}.png"

    @property
    def retrieval(self) -> Path:
        """The default output folder of ``ibot retrieve``."""
        return self.root / "retrieval"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_figures(self) -> Path:
        return self.root / "report"

    def relative(self, path: Path) -> str:
        """``path`` as a link from a page in the folder (``report/losses.png``)."""
        return path.relative_to(self.root).as_posix()

    def contains(self, path: str | Path) -> bool:
        """Whether ``path`` is the folder or lies inside it (resolved: links and ``..`` followed)."""
        root, other = self.root.resolve(), Path(path).resolve()
        return other == root or root in other.parents

    # --- does it hold a run? ---------------------------------------------------------------------
    def artefacts(self) -> list[Path]:
        """The files of a run that exist here: checkpoints, the link, weights, metrics, eval results."""
        found = [p for _, p in self.step_checkpoints()]
        link = self.checkpoint_link
        if link.is_symlink() or link.exists():
            found.append(link)
        found += [p for p in (self.teacher, self.metrics) if p.is_file()]
        if self.eval_dir.is_dir():
            found += sorted(self.eval_dir.glob("*.json"))
        return found

    def holds_run(self) -> bool:
        return bool(self.artefacts())

    def describe_run(self) -> str:
        """What the run here holds, for a refusal: ``checkpoints of an earlier run (a, b, ...)``."""
        found = self.artefacts()
        names = {p.name for p in found}
        if self.step_checkpoints() or CHECKPOINT_NAME in names:
            kind = "checkpoints"
        elif TEACHER_NAME in names:
            kind = "weights"
        elif self.metrics.name in names:
            kind = "metrics"
        else:
            kind = "evaluation results"
        shown = ", ".join(self.relative(p) for p in found[:4]) + (", ..." if len(found) > 4 else "")
        return f"{kind} of an earlier run ({shown})"

    # --- the lock -------------------------------------------------------------------------------
    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_NAME

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the folder's advisory lock while the block runs; ``RunFolderLocked`` (one line naming
        the holder's PID and command) when another process holds it.

        The folder is made if need be. On release the lock file is removed (while still locked),
        and a folder the lock alone made is removed when nothing else was written into it, so a
        command that wrote nothing leaves no trace. The same process may take it again inside.
        """
        key = self.root.resolve()
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        made: list[Path] = []
        try:
            fd = self._acquire(command, made)
        except BaseException:
            _remove_empty(made)
            raise
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            try:
                self.lock_file.unlink(missing_ok=True)  # still locked: no other process holds this inode
            finally:
                os.close(fd)
                _remove_empty(made)

    def _acquire(self, command: str, made: list[Path]) -> int:
        """An open descriptor of the lock file, locked; retried when the file was replaced meanwhile.
        ``made``: the folders this made (the run folder and its parents), deepest first."""
        while True:
            try:
                made[:0] = _make_folders(self.root)
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a holder removed the folder it had made meanwhile: again
                continue
            except OSError as exc:
                raise DataError(
                    f"{self.lock_file}: cannot make the run folder's lock file ({exc.strerror or type(exc).__name__})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderLocked(
                    f"{self.root}: in use by {holder}; wait for it to end or choose another folder"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder may have removed the file between our open and our lock: the
            # lock must be on the inode the name still points to, or a third process could take another.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = json.dumps({"pid": os.getpid(), "command": command, "argv": sys.argv})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder + "\n").encode(), 0)
        return fd


def _read_holder(fd: int) -> str:
    """``PID 1234 (ibot pretrain)``: the holder's PID as the kernel lists it (``/proc/locks``), else as
    the holder wrote it into the lock file (this module's JSON, or a bare PID from another tool)."""
    try:
        written = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        written = ""
    pid, command = _written_holder(written)
    try:
        listed = flock_holder(os.fstat(fd))
    except OSError:
        listed = None
    if listed is not None and listed != pid:  # the file is not yet (or no longer) the holder's word
        pid, command = listed, None
    if pid is None:
        return "another process (it has not written its PID yet)"
    return f"PID {pid}" + (f" ({command})" if command else "")


def _written_holder(text: str) -> tuple[int | None, str | None]:
    """(PID, command) from the lock file's text: ``{"pid": .., "command": ..}`` or a bare integer."""
    if text.isdigit():
        return int(text), None
    try:
        holder = json.loads(text)
        return int(holder["pid"]), str(holder.get("command") or "") or None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, None


def flock_holder(stat: os.stat_result, locks: str = "/proc/locks") -> int | None:
    """The PID holding an exclusive ``flock`` on the file of ``stat``, as ``/proc/locks`` lists it
    (``1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF``: device major:minor in hex, inode);
    None where that file is missing (not Linux) or names no such holder (another PID namespace)."""
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open(locks) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # A waiter is listed as "N: -> FLOCK ...": only the holder's own line counts.
        if len(fields) >= 6 and fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and fields[5] == device:
            pid = int(fields[4]) if fields[4].isdigit() else 0
            if pid > 0:
                return pid
    return None


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; the folders made, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this process made, deepest first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # something was written into it (or another process made it its own)
            return
