"""Faults lose nothing: kept and linked checkpoints, debris, full disks, signals, restarts, non-finite losses."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ibot.cli import main
from ibot.config import Config, load_config
from ibot.errors import ConfigError, DataError, NonFiniteLossError
from ibot.storage import CHECKPOINT_NAME, load_checkpoint
from ibot.train import checkpoint as ckpt
from ibot.train.loop import train
from ibot.train.metrics import read_metrics
from ibot.train.signals import StopRequests

from conftest import tiny_overrides


def _with(cfg: Config, **train_fields: object) -> Config:
    return replace(cfg, train=replace(cfg.train, **train_fields))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".", "checkpoint")))


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a / CHECKPOINT_NAME), load_checkpoint(b / CHECKPOINT_NAME)
    assert x["step"] == y["step"]
    assert x["method"].keys() == y["method"].keys()
    for key in x["method"]:
        assert torch.equal(x["method"][key], y["method"][key]), key


def test_keeps_the_newest_k_step_checkpoints_and_links_the_newest(tiny_config: Config) -> None:
    train(_with(tiny_config, checkpoint_every=2, keep_checkpoints=2), progress=False)  # saves at 2, 4, 6, 8
    out = Path(tiny_config.train.output_dir)
    assert _files(out) == ["checkpoint-00000006.pt", "checkpoint-00000008.pt", CHECKPOINT_NAME]
    assert os.readlink(out / CHECKPOINT_NAME) == "checkpoint-00000008.pt"
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 8


def test_atomic_write_fsyncs_the_file_and_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    ckpt.atomic_write(tmp_path / "x.bin", lambda tmp: Path(tmp).write_bytes(b"data"))
    assert (tmp_path / "x.bin").read_bytes() == b"data"
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)


def test_resume_removes_debris_and_falls_back_past_an_unreadable_checkpoint(
    image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = load_config(None, tiny_overrides(image_folder, tmp_path / "full"))
    train(full, progress=False)
    part = _with(load_config(None, tiny_overrides(image_folder, tmp_path / "part")), checkpoint_every=2)
    train(_with(part, max_steps=6), progress=False)
    out = tmp_path / "part"
    newest = out / "checkpoint-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    (out / ".checkpoint-00000008.pt.abc123.tmp").write_bytes(b"\0" * 4096)  # a killed writer's file
    with caplog.at_level("WARNING"):
        assert train(part, resume=True, progress=False).step == 8
    assert "falling back" in caplog.text and "checkpoint-00000006.pt" in caplog.text
    assert not list(out.glob(".*.tmp"))
    assert (out / "checkpoint-00000006.pt.unreadable").is_file()  # kept for a look, no longer a candidate
    _assert_same_weights(tmp_path / "full", out)  # resumed from step 4: still the same training


# How a full disk reaches the writer: Python I/O raises OSError(ENOSPC); torch.save's zip writer
# raises a RuntimeError without an errno (measured on a full tmpfs, torch 2.14).
DISK_FULL = {
    "oserror": OSError(errno.ENOSPC, "No space left on device"),
    "torch-writer": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
}


@pytest.mark.parametrize("raised", DISK_FULL, ids=list(DISK_FULL))
def test_disk_full_while_saving_names_path_and_step_and_keeps_the_previous(
    image_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raised: str,
) -> None:
    real_save, real_usage = torch.save, ckpt.shutil.disk_usage
    calls = []

    def save_until_full(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: part of it lands, then the disk is full
            Path(f).write_bytes(b"\0" * 1000)
            raise DISK_FULL[raised]
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    full_disk = lambda folder: real_usage(folder)._replace(free=4096) if len(calls) >= 2 else real_usage(folder)  # noqa: E731
    monkeypatch.setattr(ckpt.shutil, "disk_usage", full_disk)
    run = tmp_path / "run"
    args = ["pretrain", "--config", _empty_config(tmp_path), "--no-progress", *tiny_overrides(image_folder, run)]
    assert main([*args, "train.checkpoint_every=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoint-00000004.pt" in err and "step 4" in err and "disk full" in err
    assert load_checkpoint(run / CHECKPOINT_NAME)["step"] == 2
    assert _files(run) == ["checkpoint-00000002.pt", CHECKPOINT_NAME]  # no temporary file left


def test_resume_needs_a_checkpoint_and_a_new_run_refuses_an_old_ones(tiny_config: Config) -> None:
    with pytest.raises(DataError, match="no checkpoint to resume from"):
        train(tiny_config, resume=True, progress=False)
    train(_with(tiny_config, max_steps=2), progress=False)
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
        train(tiny_config, progress=False)


def test_resuming_a_run_that_reached_max_steps_trains_no_further(tiny_config: Config) -> None:
    cfg = _with(tiny_config, max_steps=3)
    train(cfg, progress=False)
    out = Path(cfg.train.output_dir)
    before = (out / CHECKPOINT_NAME).resolve().read_bytes()
    assert train(cfg, resume=True, progress=False).step == 3
    assert _files(out) == ["checkpoint-00000003.pt", CHECKPOINT_NAME]
    assert (out / CHECKPOINT_NAME).resolve().read_bytes() == before


def test_a_resumed_run_logs_each_step_once(tiny_config: Config) -> None:
    cfg = _with(tiny_config, checkpoint_every=2)
    train(_with(cfg, max_steps=4), progress=False)
    out = Path(cfg.train.output_dir)
    (out / "checkpoint-00000004.pt").unlink()  # as if killed after logging step 4, before its checkpoint
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.')  # and in the middle of the next line
    train(cfg, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 9))


def _empty_config(tmp_path: Path) -> str:
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    return str(path)


def _start_pretrain(tmp_path: Path, overrides: list[str], new_session: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ibot", "pretrain", "--config", _empty_config(tmp_path), "--no-progress", *overrides]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=new_session)


def _wait_for_steps(run: Path, steps: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count("\n") >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not log {steps} steps in time")


@pytest.mark.parametrize(
    "how, workers",
    [("SIGTERM to the process", 0), ("SIGTERM to the process group", 2), ("Ctrl-C to the process group", 2)],
    ids=["sigterm", "sigterm-group", "ctrl-c"],
)
def test_a_stop_signal_finishes_the_step_saves_and_resumes_exactly(
    image_folder: Path, tmp_path: Path, how: str, workers: int
) -> None:
    # 100 steps: time to be interrupted; one thread as in this process, so the sums add up the same way
    common = [f"data.num_workers={workers}", "optim.epochs=25", "train.threads=1"]
    run = tmp_path / "stopped"
    process = _start_pretrain(tmp_path, tiny_overrides(image_folder, run) + common, new_session=True)
    _wait_for_steps(run, 3, process)
    if how == "SIGTERM to the process":
        process.send_signal(signal.SIGTERM)
    else:  # as SLURM and `kill -- -PGID` do: the loader workers get it too
        os.killpg(process.pid, signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert "Resume with: ibot pretrain" in err and "--resume" in err
    stopped_at = load_checkpoint(run / CHECKPOINT_NAME)["step"]
    assert 3 <= stopped_at < 100
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] == stopped_at  # the step it finished, saved
    train(load_config(None, tiny_overrides(image_folder, run) + common), resume=True, progress=False)
    train(load_config(None, tiny_overrides(image_folder, tmp_path / "full") + common), progress=False)
    _assert_same_weights(tmp_path / "full", run)


def test_a_second_signal_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with StopRequests() as requests:
        requests._handle(signal.SIGTERM, None)
        assert requests.name == "SIGTERM" and exits == []
        now[0] += 0.2  # torchrun forwarding the same Ctrl-C: the same request
        requests._handle(signal.SIGTERM, None)
        assert exits == []
        now[0] += 5.0
        requests._handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


def test_the_previous_handler_is_called_after_the_checkpoint() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with StopRequests() as requests:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert seen == [] and requests.signum == signal.SIGTERM  # held while the loop saves
        requests.hand_on()
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def _nan_at(calls: set[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the method's loss NaN at the given forward calls (1-based)."""
    from ibot.method import IBOT

    forward = IBOT.forward
    count = [0]

    def poisoned(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = forward(self, *args, **kwargs)
        count[0] += 1
        return replace(out, total=out.total * float("nan")) if count[0] in calls else out

    monkeypatch.setattr(IBOT, "forward", poisoned)


def test_non_finite_steps_are_skipped_up_to_the_limit(
    tiny_config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _nan_at({3}, monkeypatch)
    with caplog.at_level("WARNING"):
        result = train(_with(tiny_config, skip_nonfinite_steps=1), progress=False)
    assert result.step == 8 and result.skipped_steps == 1
    assert "step 3: non-finite loss, update skipped" in caplog.text
    state = load_checkpoint(Path(tiny_config.train.output_dir) / CHECKPOINT_NAME)["method"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_one_non_finite_step_too_many_stops_the_run(tiny_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at({3, 5}, monkeypatch)
    with pytest.raises(NonFiniteLossError, match="more than train.skip_nonfinite_steps=1"):
        train(_with(tiny_config, skip_nonfinite_steps=1), progress=False)


def _broken_folder(root: Path, count: int) -> Path:
    """``count`` files named like images that are not images."""
    (root / "a").mkdir(parents=True)
    for i in range(count):
        (root / "a" / f"{i:02d}.png").write_bytes(b"not a png %d" % i)
    return root


def _bounded_loader(monkeypatch: pytest.MonkeyPatch, batches: int, hook=None) -> None:  # type: ignore[no-untyped-def]
    """The real loader, cut after ``batches`` (a loop that never ends fails the test instead of hanging
    it); ``hook(i)`` runs before the i-th batch is handed over."""
    import itertools

    import ibot.train.loop as loop

    real = loop.build_train_loader

    def build(cfg, *args, **kwargs):  # type: ignore[no-untyped-def]
        loader, dataset = real(cfg, *args, **kwargs)

        def cut():  # type: ignore[no-untyped-def]
            for i, batch in enumerate(itertools.islice(loader, batches)):
                if hook is not None:
                    hook(i)
                yield batch

        return cut(), dataset

    monkeypatch.setattr(loop, "build_train_loader", build)


@pytest.mark.parametrize("pipeline, workers", [("pil", 0), ("device", 2)])
def test_a_folder_where_nothing_decodes_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], pipeline: str, workers: int
) -> None:
    data = _broken_folder(tmp_path / "broken", 10)
    _bounded_loader(monkeypatch, 200)  # an epoch is 10 images: 3 batches of 4 hold one
    run = tmp_path / "run"
    overrides = tiny_overrides(data, run) + [f"data.pipeline={pipeline}", f"data.num_workers={workers}"]
    code = main(["pretrain", "--config", _empty_config(tmp_path), "--no-progress", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"ibot: error: no image in {data} decoded: 10 files skipped, see {run / 'skipped.tsv'}"
    assert "Traceback" not in "\n".join(err)
    listed = (run / "skipped.tsv").read_text().splitlines()[1:]
    assert sorted(line.split("\t")[0] for line in listed) == sorted(str(p) for p in (data / "a").iterdir())
    assert not list(run.glob("checkpoint*"))


def test_a_folder_where_some_images_decode_trains_and_counts_them(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _broken_folder(image_folder / "zz_broken", 2)  # 18 files listed, 16 images
    result = train(load_config(None, tiny_overrides(image_folder, tmp_path / "run")), progress=False)
    # 2 epochs of 4 steps: 32 draws from a permutation of 18 files hold them all.
    assert result.step == 8 and result.listed_images == 18
    assert result.decoded_images == 16 and result.skipped_images == 2


def test_a_stop_signal_during_batches_without_images_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _broken_folder(tmp_path / "broken", 40)  # an epoch is 10 batches: the signal comes first

    def signal_at_the_third(i: int) -> None:
        if i == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    _bounded_loader(monkeypatch, 200, signal_at_the_third)
    cfg = load_config(None, tiny_overrides(data, tmp_path / "run"))
    result = train(cfg, progress=False)
    assert result.stopped_by == "SIGTERM" and result.step == 0
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 0  # resumable from where it stopped
