"""Benchmark CPU pre-training's intra-op threads against a busy core. Prints a markdown table.

A pre-training with torch's default of one OpenMP thread per core can slow down several times
when another process holds one of the cores. This script measures, interleaved on one host:

- ``unset``: OMP_WAIT_POLICY unset (libgomp spins a while at every barrier), ``train.threads=0``
  (torch's default: one thread per core); ``ibot`` before it set OMP_WAIT_POLICY itself;
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (a waiting thread sleeps at once), same threads;
- ``threads1``: OMP_WAIT_POLICY unset, ``train.threads=1``;
- ``shipped``: plain ``python -m ibot`` with nothing set: what a user gets now;

each with the machine as it is (``+0``) and with ``--hogs`` extra CPU-bound processes
(``python -c 'while True: pass'``, started before and killed after the block). Every run is a
fresh ``ibot pretrain`` subprocess of ``--steps`` steps; its images/s are read from its
metrics.jsonl, the first log window (start-up, the workers' first batches) left out. Within a
repeat the variants run back to back, in an order rotated from repeat to repeat, so that load
from elsewhere on the host falls on each variant alike.

    python benchmarks/threads.py --config configs/demo.yaml --steps 16 --log-every 4 --repeats 3

The variants other than ``shipped`` import torch before ``ibot.cli.main`` runs, so that the
OpenMP settings are the environment's as given (libgomp reads them when torch loads).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# torch (and with it libgomp, which reads OMP_* once) loads before ibot.cli.main can set anything.
PINNED = "import sys, torch; from ibot.cli import main; sys.exit(main(sys.argv[1:]))"
VARIANTS = {  # name -> (OMP_WAIT_POLICY or None for unset, extra overrides, whether ibot's own entry point)
    "unset": (None, [], False),
    "passive": ("PASSIVE", [], False),
    "threads1": (None, ["train.threads=1"], False),
    "shipped": (None, [], True),
}
HOG = "while True: pass"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=16, help="training steps per run")
    parser.add_argument("--log-every", type=int, default=4, help="log window in steps (the first is left out)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--hogs", type=int, default=1, help="extra CPU-bound processes in the loaded condition (0: no such condition)"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", help="also write every run's figures to this file")
    parser.add_argument("overrides", nargs="*", help="more dotted config overrides for every run")
    args = parser.parse_args(argv)
    if args.steps < 2 * args.log_every:
        parser.error("--steps must cover at least two log windows (the first is left out)")
    return args


def steady_state(rows: list[dict], log_every: int, batch: int) -> tuple[float, float]:
    """(images/s, time-weighted data-wait share) over the log windows after the first: the input
    benchmark's ``steady_state`` with the first log window as its warm-up."""
    spec = importlib.util.spec_from_file_location("benchmark_input", Path(__file__).with_name("input.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module.steady_state(rows, log_every, batch)


def rotated(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


def run_once(variant: str, args: argparse.Namespace, batch: int) -> tuple[float, float]:
    """One pre-training subprocess; its steady images/s and data-wait share."""
    policy, extra, shipped = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    with tempfile.TemporaryDirectory(prefix="ibot-threads-") as out:
        entry = ["-m", "ibot"] if shipped else ["-c", PINNED]
        cmd = [sys.executable, *entry, "pretrain", "--config", args.config, "--no-progress", "--output-dir", out]
        cmd += [f"train.max_steps={args.steps}", f"train.log_every={args.log_every}", "train.checkpoint_every=1000000"]
        cmd += ["eval.monitor_every_minutes=0", "data.index_cache=", *extra, *args.overrides]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{variant}: exit {done.returncode}\n{done.stderr[-2000:]}")
        with open(Path(out) / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f if '"images_per_second"' in line]
    return steady_state(rows, args.log_every, batch)


def start_hogs(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(count)]


def stop(hogs: list[subprocess.Popen]) -> None:
    for hog in hogs:
        hog.kill()
        hog.wait()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} CPUs"


def table(results: dict[tuple[str, int], list[float]], variants: list[str], loads: list[int]) -> str:
    """Median (min-max) images/s per variant and load; "x unset": the median of the ratios of runs of one block."""
    head = ["variant"]
    for load in loads:
        head += [f"+ {load} busy: images/s" if load else "machine as is: images/s", "x unset"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        cells = [v]
        for load in loads:
            values = results[v, load]
            base = results.get(("unset", load))
            ratio = statistics.median(x / b for x, b in zip(values, base)) if base else float("nan")
            cells += [f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})", f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from ibot.config import load_config

    batch = load_config(args.config, list(args.overrides)).data.batch_size
    loads = sorted({0, args.hogs})
    results: dict[tuple[str, int], list[float]] = {(v, load): [] for v in args.variants for load in loads}
    print(f"# {cpu_model()}; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    for r in range(args.repeats):
        for load in loads if r % 2 == 0 else loads[::-1]:
            hogs = start_hogs(load)
            try:
                for v in rotated(list(args.variants), r):
                    t0 = time.monotonic()
                    ips, wait = run_once(v, args, batch)
                    results[v, load].append(ips)
                    print(
                        f"repeat {r} +{load} busy {v:9s} {ips:6.1f} images/s, data wait {100 * wait:3.0f} % "
                        f"({time.monotonic() - t0:.0f} s, load average {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
            finally:
                stop(hogs)
    print()
    print(f"{args.config}, {args.steps} steps, first {args.log_every} left out; median (min-max) of {args.repeats}")
    print(table(results, list(args.variants), loads))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{v}+{n}": x for (v, n), x in results.items()}, indent=1))


if __name__ == "__main__":
    main()
