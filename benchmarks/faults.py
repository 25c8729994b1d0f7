"""The fault matrix of ``ibot pretrain``: kills, a full disk, signals, a torchrun worker death; prints a table.

Every fault is dealt to a real ``python -m ibot pretrain`` process (or torchrun job) on the
embedded CIFAR-10 sample, and the run is resumed until it ends. A row compares the final
checkpoint with an uninterrupted run of the same config (bit for bit) and counts what the
faults left behind in the run folder (temporary files, unreadable checkpoints, extra
checkpoints beyond ``train.keep_checkpoints``).

    python benchmarks/faults.py                       # 20 random SIGKILLs, 10 during writes, the rest
    python benchmarks/faults.py --kills 5 --write-kills 3 --steps 24

ENOSPC uses a real tmpfs too small for two checkpoints when this process may mount one (root
on Linux), else a ``torch.save`` that fails part way (said in the row).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "cifar10_sample" / "train"


@dataclass
class Row:
    fault: str
    tries: int = 0
    resumed: int = 0
    identical: str = "-"
    orphaned_bytes: int = 0
    seconds: float = 0.0
    note: str = ""


def overrides(out: Path, steps: int) -> list[str]:
    """A small CIFAR recipe: ViT-Tiny width, 4 blocks, 8 px patches, 2x32 + 2x16 crops, a checkpoint
    every 3 steps (~45 MB each, so a kill can land inside a write)."""
    return [
        f"data.path={SAMPLE}",
        "data.index_cache=",
        "data.batch_size=32",
        "data.num_workers=0",
        "data.global_crop_size=32",
        "data.local_crop_size=16",
        "data.num_local_crops=2",
        "model.arch=vit_tiny",
        "model.depth=4",
        "model.patch_size=8",
        "model.out_dim=4096",
        "optim.epochs=100",
        f"train.max_steps={steps}",
        "train.checkpoint_every=3",
        "train.log_every=1",
        "train.threads=2",
        "train.device=cpu",
        f"train.output_dir={out}",
    ]


def pretrain_cmd(config: Path, out: Path, steps: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "ibot", "pretrain", "--config", str(config), "--no-progress"]
    return cmd + overrides(out, steps) + (["--resume"] if resume else [])


def has_checkpoint(out: Path) -> bool:
    return any(out.glob("checkpoint-*.pt"))


def newest_step(out: Path) -> int:
    return max((int(p.stem.split("-")[1]) for p in out.glob("checkpoint-*.pt")), default=0)


def debris(out: Path, keep: int = 2) -> int:
    """Bytes a clean run would not leave: temporary files, set-aside checkpoints, checkpoints beyond ``keep``."""
    extra = sorted(out.glob("checkpoint-*.pt"))[:-keep]
    junk = [*out.glob(".*.tmp"), *out.glob("*.unreadable"), *extra]
    return sum(p.stat().st_size for p in junk if p.is_file())


def same_weights(a: Path, b: Path) -> str:
    x = torch.load(a / "checkpoint.pt", weights_only=True)
    y = torch.load(b / "checkpoint.pt", weights_only=True)
    same = x["step"] == y["step"] and all(torch.equal(x["method"][k], y["method"][k]) for k in x["method"])
    return "yes" if same else f"NO (steps {x['step']} / {y['step']})"


def run_to_end(config: Path, out: Path, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run(pretrain_cmd(config, out, steps, has_checkpoint(out)), capture_output=True, text=True)


def kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> bool:  # type: ignore[no-untyped-def]
    """SIGKILL ``process`` as soon as ``ready()``; False if it ended first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.kill()
            process.wait()
            return True
        time.sleep(0.002)
    process.wait()
    return False


def _logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.is_file() else 0


def _after_first_step(out: Path, seconds: float):  # type: ignore[no-untyped-def]
    """A ``ready()`` that turns true ``seconds`` after the run logs its next step."""
    start, first = _logged_steps(out), [0.0]

    def ready() -> bool:
        if not first[0] and _logged_steps(out) > start:
            first[0] = time.monotonic()
        return bool(first[0]) and time.monotonic() >= first[0] + seconds

    return ready


def sigkills(config: Path, ref: Path, work: Path, steps: int, kills: int, during_write: bool, seed: int) -> Row:
    """Kill the run ``kills`` times (at random moments, or while a checkpoint is being written), then finish it."""
    row = Row("SIGKILL during checkpoint writes" if during_write else "SIGKILL at random moments")
    out, rng, t0 = work / row.fault.replace(" ", "_"), random.Random(seed), time.monotonic()
    writes_hit = 0
    while row.tries < kills:
        resume = has_checkpoint(out)
        process = subprocess.Popen(
            pretrain_cmd(config, out, steps, resume), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if during_write:
            # Let 0-2 writes of this attempt finish, then kill inside the next one.
            after = newest_step(out) + 3 * rng.randint(0, 2)
            ready = lambda after=after: newest_step(out) >= after and any(out.glob(".checkpoint-*.tmp"))  # noqa: E731
        elif rng.random() < 0.25:  # in start-up or resume, whatever the host's speed
            at = time.monotonic() + rng.uniform(0.5, 6.0)
            ready = lambda at=at: time.monotonic() >= at  # noqa: E731
        else:  # in training: a random time after this attempt's first step
            ready = _after_first_step(out, rng.uniform(0.0, 12.0))
        if not kill_when(process, ready):
            break  # it finished before the kill: start over with fewer steps left to cover
        row.tries += 1
        row.resumed += resume
        writes_hit += during_write and any(out.glob(".checkpoint-*.tmp"))
    row.resumed += has_checkpoint(out)
    done = run_to_end(config, out, steps)
    row.identical = same_weights(ref, out) if done.returncode == 0 else f"NO (exit {done.returncode})"
    row.orphaned_bytes = debris(out)
    row.seconds = time.monotonic() - t0
    if during_write:
        row.note = f"{writes_hit} kills with a .tmp checkpoint half written"
    return row


def sigterm(config: Path, ref: Path, work: Path, steps: int) -> Row:
    row, out, t0 = Row("SIGTERM, then --resume"), work / "sigterm", time.monotonic()
    process = subprocess.Popen(pretrain_cmd(config, out, steps, False), stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not (out / "metrics.jsonl").is_file():
        time.sleep(0.05)
    time.sleep(2.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate()
    row.tries = 1
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"] if has_checkpoint(out) else 0
    resume_line = next((line for line in err.splitlines() if "Resume with" in line), "")
    row.note = f"exit {process.returncode}, checkpoint at step {saved}" + (
        ", printed how to resume" if resume_line else ""
    )
    done = run_to_end(config, out, steps)
    row.resumed = 1
    row.identical = same_weights(ref, out) if done.returncode == 0 else f"NO (exit {done.returncode})"
    row.orphaned_bytes, row.seconds = debris(out), time.monotonic() - t0
    return row


def enospc(config: Path, work: Path, steps: int) -> Row:
    """The output folder on a tmpfs with room for one checkpoint: the second save hits a full disk."""
    row, t0 = Row("ENOSPC while saving"), time.monotonic()
    mount = work / "small_disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mount)], capture_output=True)
    out = mount / "run"
    try:
        if mounted.returncode == 0:
            done = subprocess.run(pretrain_cmd(config, out, steps, False), capture_output=True, text=True)
            row.note = "real tmpfs of 150 MB"
        else:
            code = (
                "import errno, sys, torch\nfrom pathlib import Path\nreal, n = torch.save, [0]\n"
                "def save(obj, f, *a, **k):\n    n[0] += 1\n    if n[0] == 2:\n"
                "        Path(f).write_bytes(bytes(1000)); raise OSError(errno.ENOSPC, 'No space left on device')\n"
                "    return real(obj, f, *a, **k)\ntorch.save = save\n"
                "from ibot.cli import main\nsys.exit(main(sys.argv[1:]))\n"
            )
            cmd = [sys.executable, "-c", code, *pretrain_cmd(config, out, steps, False)[3:]]
            done = subprocess.run(cmd, capture_output=True, text=True)
            row.note = "simulated (no tmpfs): torch.save fails part way"
        row.tries = 1
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        intact = torch.load(out / "checkpoint.pt", weights_only=True)["step"] if has_checkpoint(out) else None
        row.identical = f"previous checkpoint (step {intact}) loads" if intact else "NO checkpoint"
        row.note += f"; exit {done.returncode}: {last[:160]}"
        row.orphaned_bytes = debris(out)
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(mount)], check=False)
    row.seconds = time.monotonic() - t0
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_cmd(config: Path, out: Path, steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "2"]
    # c10d rendezvous: with the static one, gloo cannot reconnect after a restart (see README)
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "ibot", "pretrain"]
    cmd += ["--config", str(config), "--no-progress", *overrides(out, steps), "data.batch_size=16", "train.threads=1"]
    return cmd


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def torchrun_kill(config: Path, work: Path, steps: int, seed: int) -> Row:
    """2 CPU processes (gloo) under ``torchrun --max-restarts 2``; one worker SIGKILLed after a checkpoint."""
    row, t0 = Row("torchrun worker SIGKILL (2 x gloo)"), time.monotonic()
    ref = subprocess.run(torchrun_cmd(config, work / "torchrun_ref", steps), capture_output=True, text=True)
    if ref.returncode != 0:
        row.note = f"reference run failed: {ref.stderr[-300:]}"
        return row
    out = work / "torchrun_killed"
    job = subprocess.Popen(torchrun_cmd(config, out, steps), stderr=subprocess.PIPE, text=True)
    rng = random.Random(seed)
    while job.poll() is None and len(list(out.glob("checkpoint-*.pt"))) < 1:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.5, 3.0))
    workers = children(job.pid)
    if workers:
        os.kill(rng.choice(workers), signal.SIGKILL)
        row.tries = 1
    _, err = job.communicate()
    row.resumed = err.count("resumed from")
    row.identical = same_weights(work / "torchrun_ref", out) if job.returncode == 0 else f"NO (exit {job.returncode})"
    row.orphaned_bytes, row.seconds = debris(out), time.monotonic() - t0
    row.note = f"{len(workers)} workers found, restarts resumed {row.resumed} process(es)"
    return row


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``: a decompression bomb for any reader that trusts it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def hostile_folder(base: Path, per_class: int = 40) -> Path:
    """Three classes of embedded CIFAR-10 JPEGs and every kind of trouble a user's folder holds."""
    root = base / "messy"
    for name in ("airplane", "cat", "ship"):
        (root / name).mkdir(parents=True)
        for src in sorted((SAMPLE / name).glob("*.jpg"))[:per_class]:
            shutil.copy(src, root / name / src.name)
    good = next((root / "cat").glob("*.jpg")).read_bytes()
    (root / "cat" / "loop").symlink_to("..")  # the loop that multiplied a folder 40 times
    (root / "ship" / "up").symlink_to("../..")  # a link above the root
    (root / "ship" / "gone.jpg").symlink_to(base / "nowhere.jpg")
    (root / "ship" / "album.jpg").mkdir()  # a directory named like an image
    (root / "airplane" / "empty.jpg").write_bytes(b"")
    (root / "airplane" / "cut.jpg").write_bytes(good[: len(good) // 3])
    (root / "airplane" / "notes.jpg").write_text("not a picture\n")
    (root / "cat" / "bomb.png").write_bytes(_png_header(30_000, 30_000))
    return root


def hostile_commands(work: Path) -> list[tuple[str, int, str]]:
    """Every image-reading command on the messy folder: (command, exit code, its line about skipped files)."""
    folder, run = hostile_folder(work), work / "messy_run"
    config = work / "empty.yaml"
    tiny = ["model.arch=vit_pico", "model.patch_size=4", "model.out_dim=64", "data.global_crop_size=32"]
    tiny += ["data.local_crop_size=16", "data.batch_size=16", "data.num_workers=0", "data.index_cache="]
    evals = ["eval.probe_epochs=1", "eval.dense_train_mosaics=16", "eval.dense_test_mosaics=8", "eval.crop_ratio=1"]
    evals += ["eval.robustness_images=8", "finetune.epochs=1", "finetune.batch_size=16", "finetune.num_workers=0"]
    where = ["--train-dir", str(folder), "--test-dir", str(folder), "--no-progress"]
    commands = {
        "pretrain": ["pretrain", "--config", str(config), "--no-progress", f"data.path={folder}", *tiny]
        + ["train.max_steps=4", f"train.output_dir={run}", f"eval.train_path={folder}", f"eval.test_path={folder}"]
        + ["eval.monitor_every_minutes=60", "eval.monitor_train_images=40", "eval.monitor_test_images=20"],
        **{f"eval {c}": ["eval", c, str(run), *where, *evals] for c in ("knn", "probe", "robustness", "dense")},
        "eval finetune": ["eval", "finetune", str(run), *where, *evals],
        "visualize attention": ["visualize", "attention", str(run), "--images", str(folder)],
    }
    rows = []
    for name, args in commands.items():
        done = subprocess.run([sys.executable, "-m", "ibot", *args], capture_output=True, text=True)
        said = [line.split(" ", 1)[-1] for line in (done.stdout + done.stderr).splitlines() if "skipped" in line]
        rows.append((name, done.returncode, " / ".join(said) or done.stderr.strip()[-200:]))
    return rows


def print_table(rows: list[Row]) -> None:
    print("| fault | tries | runs resumed | parameters bit-identical | orphaned bytes | wall time s | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.fault} | {r.tries} | {r.resumed} | {r.identical} | {r.orphaned_bytes} | {r.seconds:.0f} | {r.note} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs at random moments")
    parser.add_argument("--write-kills", type=int, default=10, help="SIGKILLs while a checkpoint is written")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=["random", "write", "sigterm", "enospc", "torchrun", "hostile"])
    parser.add_argument("--work", default="", help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ibot-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        sys.exit(f"--work {work}: not empty; the matrix needs fresh run folders")
    config = work / "empty.yaml"
    config.write_text("{}\n")
    ref, rows = work / "reference", []
    try:
        t0 = time.monotonic()
        if {"random", "write", "sigterm"} & set(args.only):
            done = subprocess.run(pretrain_cmd(config, ref, args.steps, False), capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"the uninterrupted reference run failed:\n{done.stderr[-2000:]}")
            print(f"reference: {args.steps} steps uninterrupted in {time.monotonic() - t0:.0f} s", flush=True)
        if "random" in args.only:
            rows.append(sigkills(config, ref, work, args.steps, args.kills, False, args.seed))
        if "write" in args.only:
            rows.append(sigkills(config, ref, work, args.steps, args.write_kills, True, args.seed))
        if "sigterm" in args.only:
            rows.append(sigterm(config, ref, work, args.steps))
        if "enospc" in args.only:
            rows.append(enospc(config, work, args.steps))
        if "torchrun" in args.only:
            rows.append(torchrun_kill(config, work, 12, args.seed))
        print_table(rows)
        if "hostile" in args.only:
            print("\n| command on a messy folder | exit | what it printed about skipped files |\n|---|---|---|")
            for name, code, said in hostile_commands(work):
                print(f"| {name} | {code} | {said} |")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
