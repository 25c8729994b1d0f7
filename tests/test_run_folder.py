"""A run folder is owned: its layout in one place, its lock, and a new run that never overwrites one."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ibot import run_folder
from ibot.cli import main
from ibot.config import load_config
from ibot.run_folder import LOCK_NAME, RunFolder, RunFolderLocked
from ibot.train.loop import train

from conftest import make_image_folder, tiny_overrides

SRC = str(Path(run_folder.__file__).resolve().parents[1])


def _hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (dot files too) -> its content's hash."""
    files = (p for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A two-step tiny run (checkpoint, teacher, metrics, config) and its image folder; copy before changing."""
    base = tmp_path_factory.mktemp("finished")
    images = make_image_folder(base / "images", classes=2, per_class=4)
    cfg = load_config(None, [*tiny_overrides(images, base / "run"), "train.max_steps=2", "train.checkpoint_every=2"])
    train(cfg, progress=False)
    return base / "run", images


def _copy(finished: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished[0], tmp_path / "run", symlinks=True))


def _pretrain(run: Path, images: Path, *extra: str) -> list[str]:
    config = images.parent / "empty.yaml"
    config.write_text("{}\n")
    return ["pretrain", "--config", str(config), "--no-progress", *tiny_overrides(images, run), "train.seed=7", *extra]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibot: error: ") and "\n" not in err, err
    return err


class Holder:
    """Another process that holds a run folder's lock until it is killed."""

    def __init__(self, folder: Path, command: str = "ibot pretrain") -> None:
        code = (
            "import sys\nfrom pathlib import Path\nfrom ibot.run_folder import RunFolder\n"
            f"with RunFolder(Path({str(folder)!r})).lock({command!r}):\n"
            "    print('locked', flush=True)\n    sys.stdin.read()\n"
        )
        env = {**os.environ, "PYTHONPATH": SRC}
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "locked\n"  # it holds the lock from here on

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no clean-up runs, the OS alone drops the lock
        assert self.process.wait(timeout=60) == -signal.SIGKILL


# --- layout -----------------------------------------------------------------------------------------


def test_the_layout_is_named_in_one_place(finished: tuple[Path, Path]) -> None:
    run = RunFolder(finished[0])
    assert RunFolder.of(run.teacher) == run == RunFolder.of(run.root)
    for path in (run.config, run.metrics, run.teacher, run.checkpoint_link):
        assert path.is_file(), path  # what pre-training wrote is where the folder says
    assert [step for step, _ in run.step_checkpoints()] == [2]
    assert run.eval_result("knn", True) == run.root / "eval" / "knn-random-init.json"
    assert run.eval_skips("knn", True) == run.root / "eval" / "skipped-knn-random-init.tsv"
    assert run.picture("pca") == run.root / "pictures" / "pca.png"
    assert run.relative(run.attention_pool(False)) == "eval/attention_pool.png"


@pytest.mark.parametrize(
    ("keep", "kind"),
    [
        ("checkpoint-00000002.pt", "checkpoints"),
        ("checkpoint.pt", "checkpoints"),
        ("teacher.safetensors", "weights"),
        ("metrics.jsonl", "metrics"),
        ("eval/knn.json", "evaluation results"),
    ],
)
def test_any_artefact_makes_a_run(keep: str, kind: str, tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    (run.root / "eval").mkdir(parents=True)
    (run.root / "config.yaml").write_text("{}\n")  # alone no run: a refused run could leave it (older versions)
    (run.root / "skipped.tsv").write_text("path\treason\n")
    assert not run.holds_run()
    (run.root / keep).write_text("x")
    assert run.artefacts() == [run.root / keep]
    assert run.describe_run() == f"{kind} of an earlier run ({keep})"


# --- the lock ---------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_until_the_holder_dies(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    holder = Holder(folder.root)
    try:
        with pytest.raises(RunFolderLocked) as refused, folder.lock("ibot eval knn"):
            pass
        message = str(refused.value)
        assert message == (
            f"{folder.root}: in use by PID {holder.process.pid} (ibot pretrain); "
            "wait for it to end or choose another folder"
        )
    finally:
        holder.kill()
    assert folder.lock_file.is_file()  # killed: nothing removed it, yet the lock is free
    with folder.lock("ibot eval knn"):
        assert json.loads(folder.lock_file.read_text())["pid"] == os.getpid()
    assert list(folder.root.iterdir()) == []  # released: the file is gone


def test_the_lock_leaves_no_trace_and_may_be_taken_again_inside(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "new" / "run")
    with folder.lock("ibot pretrain"):
        assert [p.name for p in folder.root.iterdir()] == [LOCK_NAME]
        with folder.lock("ibot report"):  # the same process: ibot demo -> pre-training -> report
            pass
        assert folder.lock_file.is_file()  # still held by the outer block
    assert list(tmp_path.iterdir()) == []  # it made the folders and wrote nothing else: all gone
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with RunFolder(existing).lock("ibot report"):
        pass
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


def test_the_lock_is_taken_on_the_file_its_name_points_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder that releases between our open and our flock unlinks the file we opened: retry."""
    folder = RunFolder(tmp_path)
    real_flock, calls = fcntl.flock, []

    def flock_after_a_release(fd: int, op: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            folder.lock_file.unlink()  # as the previous holder does on release
            folder.lock_file.write_text("")  # and a third process makes a new one
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_release)
    with folder.lock("ibot report"):
        assert len(calls) == 2  # the first lock was on the unlinked file: taken again on the new one
        assert os.path.samestat(os.fstat(calls[1]), os.stat(folder.lock_file))


class ForeignHolder:
    """A process of another tool: ``flock``s the lock file and writes ``text`` (``{pid}`` -> its PID)."""

    def __init__(self, path: Path, text: str) -> None:
        code = (
            "import fcntl, os, sys\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
            "f.seek(0)\nf.truncate()\nf.write(sys.argv[2].replace('{pid}', str(os.getpid())))\nf.flush()\n"
            "print('locked', flush=True)\nsys.stdin.read()\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, str(path), text], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "locked\n"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=60)
        assert self.process.stdout is not None and self.process.stdin is not None
        self.process.stdout.close()
        self.process.stdin.close()


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="the kernel lists no locks here (not Linux)")
@pytest.mark.parametrize("text", ["", "{pid}\n", "someone else's words", '{"pid": 1, "command": "stale"}\n'])
def test_the_holder_is_named_by_the_kernel_whatever_it_wrote(text: str, tmp_path: Path) -> None:
    """Another tool's holder may write nothing, its bare PID, anything, or an old holder's JSON:
    the PID named is the one ``/proc/locks`` lists for the lock file's inode."""
    folder = RunFolder(tmp_path)
    holder = ForeignHolder(folder.lock_file, text)
    try:
        with pytest.raises(RunFolderLocked) as refused, folder.lock("ibot report"):
            pass
        assert f"in use by PID {holder.process.pid};" in str(refused.value)
    finally:
        holder.kill()


@pytest.mark.parametrize(
    ("text", "named"),
    [("{pid}\n", "PID {pid}"), ("", "another process (it has not written its PID yet)"), ("x", "another process")],
)
def test_without_the_kernels_list_the_holder_is_named_by_the_file(
    text: str, named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``/proc/locks`` names nobody (not Linux, another PID namespace): the file's JSON or bare PID."""
    monkeypatch.setattr(run_folder, "flock_holder", lambda stat: None)
    folder = RunFolder(tmp_path)
    holder = ForeignHolder(folder.lock_file, text)
    try:
        with pytest.raises(RunFolderLocked) as refused, folder.lock("ibot report"):
            pass
        assert f"in use by {named.format(pid=holder.process.pid)}" in str(refused.value)
    finally:
        holder.kill()


def test_proc_locks_lines_of_a_waiter_another_file_or_a_posix_lock_name_nobody(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    path.write_text("")
    stat = os.stat(path)
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}"
    other = f"{device}:{stat.st_ino + 1}"
    locks = tmp_path / "locks"
    locks.write_text(
        f"1: POSIX  ADVISORY  WRITE 11 {device}:{stat.st_ino} 0 EOF\n"
        f"2: FLOCK  ADVISORY  WRITE 22 {other} 0 EOF\n"
        f"3: FLOCK  ADVISORY  READ 33 {device}:{stat.st_ino} 0 EOF\n"
        f"3: -> FLOCK  ADVISORY  WRITE 44 {device}:{stat.st_ino} 0 EOF\n"
    )
    assert run_folder.flock_holder(stat, str(locks)) is None
    locks.write_text(locks.read_text() + f"4: FLOCK  ADVISORY  WRITE 55 {device}:{stat.st_ino} 0 EOF\n")
    assert run_folder.flock_holder(stat, str(locks)) == 55
    assert run_folder.flock_holder(stat, str(tmp_path / "absent")) is None


def test_pretrain_eval_and_report_refuse_a_held_run_folder(
    finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(finished, tmp_path)
    images = finished[1]
    before = _hashes(run)
    holder = Holder(run)
    try:
        commands = [
            _pretrain(run, images, "--resume"),
            _pretrain(run, images),
            ["eval", "knn", str(run), "--train-dir", str(images), "--test-dir", str(images), "--no-progress"],
            ["report", str(run)],
        ]
        for argv in commands:
            assert main(argv) == 2
            err = _one_line_error(capsys)
            assert f"{run}: in use by PID {holder.process.pid} (ibot pretrain)" in err, argv
        assert {**before, LOCK_NAME: _hashes(run)[LOCK_NAME]} == _hashes(run)  # the run is untouched
    finally:
        holder.kill()
    assert main(["report", str(run)]) == 0  # the holder died: the folder is free again
    assert (run / "report.md").is_file() and not (run / LOCK_NAME).exists()


# --- a new run never overwrites one -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("remove", "kind"),
    [
        ((), "checkpoints"),
        (("checkpoint-00000002.pt", "checkpoint.pt"), "weights"),  # the big checkpoints deleted
        (("checkpoint-00000002.pt", "checkpoint.pt", "teacher.safetensors"), "metrics"),
    ],
)
def test_a_new_run_refuses_any_run_and_writes_nothing(
    remove: tuple[str, ...],
    kind: str,
    finished: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = _copy(finished, tmp_path)
    for name in remove:
        (run / name).unlink()
    before = _hashes(run)
    assert main(_pretrain(run, finished[1])) == 2  # train.seed=7: a config.yaml that would differ
    err = _one_line_error(capsys)
    assert f"train.output_dir: {run} holds {kind} of an earlier run (" in err and "--resume" in err
    assert _hashes(run) == before  # config.yaml included


def test_a_refused_resume_leaves_config_yaml(
    finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(finished, tmp_path)
    before = _hashes(run)
    assert main(_pretrain(run, finished[1], "--resume", "model.out_dim=48")) == 2
    assert "different model config" in _one_line_error(capsys)
    assert _hashes(run) == before


def test_pretraining_holds_the_lock_from_before_its_first_write_to_its_end(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ibot.train import loop

    run = RunFolder(tmp_path / "run")
    seen: list[str] = []
    write_run_folder, train_step = loop._write_run_folder, loop._train_step

    def first_write(folder: RunFolder, cfg: object) -> None:
        seen.append(f"locked before the first write: {folder.lock_file.is_file() and not folder.config.exists()}")
        write_run_folder(folder, cfg)

    def step_and_try_the_lock(*args: object, **kwargs: object) -> object:
        code = "from pathlib import Path\nfrom ibot.run_folder import RunFolder\n"
        code += f"RunFolder(Path({str(run.root)!r})).lock('x').__enter__()"
        env = {**os.environ, "PYTHONPATH": SRC}
        tried = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        seen.append(tried.stderr.strip().splitlines()[-1])
        return train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_write_run_folder", first_write)
    monkeypatch.setattr(loop, "_train_step", step_and_try_the_lock)
    train(load_config(None, [*tiny_overrides(image_folder, run.root), "train.max_steps=1"]), progress=False)
    assert seen == [
        "locked before the first write: True",
        f"ibot.run_folder.RunFolderLocked: {run.root}: in use by PID {os.getpid()} (ibot pretrain); "
        "wait for it to end or choose another folder",
    ]
    assert not run.lock_file.exists() and run.teacher.is_file()
