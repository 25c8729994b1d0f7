"""Benchmark the input pipeline end to end: does the loader feed the training step? Prints markdown tables.

For each config it measures, each in its own subprocess (memory, threads and workers that
one measurement leaves behind do not bias the next):

- ``synthetic``: the real training loop (``ibot.train.loop.train``) on one pre-collated batch
  repeated: the step's images/s without input cost;
- ``end-to-end``: the same loop reading the folder, per ``data.pipeline`` and worker count:
  steady-state images/s (the warm-up windows left out), the mean data-wait share and the
  ratio to ``synthetic``;
- ``loader alone``: the training DataLoader iterated with nothing else to do; at 0 workers
  and 1 thread its images/s are one CPU core's, with W workers per worker process too; and,
  for ``data.pipeline=device``, the device half (``DeviceAugment`` on batches already there).

Configs: ``cifar`` (configs/cifar10.yaml over CIFAR-10, ``--cifar``), ``B``
(configs/vit_small_imagenet.yaml: ViT-S/16, 2 x 224 + 10 x 96 crops, block masks, over an
ImageNet-like folder from benchmarks/make_jpeg_folder.py, ``--folder``), and ``png16`` /
``tiff5``: the CIFAR-10 recipe's crops over the 12-bit single-channel PNGs / 5-channel TIFFs
of benchmarks/make_domain_folder.py (``--domain``, the folder holding png16/ and tiff5/), read
at full precision (``data.channels`` 1 / 5): the loader's rate for 16-bit and N-channel
crops next to RGB's (``cifar``) in one run.

    python benchmarks/make_jpeg_folder.py runs/jpegs --images 2000 --source ../shared/data/cifar10/train
    python benchmarks/input.py --configs B --folder runs/jpegs --batch 8 --steps 6 --workers 0 2
    python benchmarks/input.py --device cuda --folder runs/jpegs --workers 0 8 16 --precision bf16
    python benchmarks/make_domain_folder.py runs/domain --source ../shared/data/cifar10/train --per-class 100
    python benchmarks/input.py --configs cifar png16 tiff5 --domain runs/domain --tables loader --workers 0

Checkpoints are not written (the loop's save is stubbed out in the subprocess): the end of a
run is not measured, and a ViT-S checkpoint costs seconds and hundreds of MB.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = {"cifar": ROOT / "configs" / "cifar10.yaml", "B": ROOT / "configs" / "vit_small_imagenet.yaml"}
# The make_domain_folder.py sub-folders: the CIFAR-10 recipe over them, data.channels as stored.
DOMAIN_CHANNELS = {"png16": 1, "tiff5": 5}
CONFIG_FILES |= {name: CONFIG_FILES["cifar"] for name in DOMAIN_CHANNELS}
PIPELINES = ("pil", "device")
UNUSED_OUTPUT = "runs/input-benchmark"  # train.output_dir of the measurements that do not train (never made)


@dataclass(frozen=True)
class Options:
    """What to measure and how; passed as JSON to each measurement's subprocess."""

    configs: tuple[str, ...] = ("cifar", "B")
    pipelines: tuple[str, ...] = PIPELINES
    workers: tuple[int, ...] = (0, 2)
    device: str = "cpu"
    precision: str = "auto"  # train.precision
    batch: int = 0  # images per step; 0: cifar's own (64), B's 8 on CPU / 256 on CUDA
    steps: int = 6  # measured steps after the warm-up
    warmup: int = 0  # steps left out first (whole log windows); 0: workers + 1, at least 2
    log_every: int = 1  # train.log_every: the metric windows (each a host sync)
    threads: int = 0  # train.threads; 0 = torch's default
    loader_seconds: float = 5.0  # loader alone: at least this long per measurement
    cifar: str = "../shared/data/cifar10/train"  # as in configs/cifar10.yaml: from the working directory
    folder: str = ""
    domain: str = ""  # make_domain_folder.py's output (configs png16, tiff5)
    tables: tuple[str, ...] = ("training", "loader")  # which tables to measure


@dataclass(frozen=True)
class Job:
    """One measurement: its kind ("synthetic", "end-to-end", "loader", "augment"), config, pipeline, workers."""

    kind: str
    config: str
    pipeline: str
    workers: int


# --- configs -------------------------------------------------------------------------------


def batch_size(config: str, options: Options) -> int:
    if options.batch > 0:
        return options.batch
    if config == "cifar" or config in DOMAIN_CHANNELS:
        return 64  # configs/cifar10.yaml's
    return 256 if options.device.startswith("cuda") else 8


def warmup_steps(workers: int, options: Options) -> int:
    """Steps left out, rounded up to whole log windows: the workers' start and their first burst of batches."""
    steps = options.warmup or max(2, workers + 1)
    return -(-steps // options.log_every) * options.log_every


def build_config(job: Job, options: Options, output_dir: str):  # type: ignore[no-untyped-def]
    """The config of ``job``: the config file, its data folder and the benchmark's run control."""
    from ibot.config import load_config

    data_path = {"cifar": options.cifar, "B": options.folder}.get(job.config) or str(Path(options.domain) / job.config)
    overrides = [
        f"data.path={data_path}",
        "data.index_cache=",
        f"data.batch_size={batch_size(job.config, options)}",
        f"data.num_workers={job.workers}",
        f"train.device={options.device}",
        f"train.precision={options.precision}",
        f"train.threads={options.threads}",
        f"train.output_dir={output_dir}",
        f"train.log_every={options.log_every}",
        f"train.max_steps={warmup_steps(job.workers, options) + options.steps}",
        "train.checkpoint_every=1000000000",
        "train.budget_minutes=0",
        "eval.monitor_every_minutes=0",
    ]
    overrides.append(f"data.pipeline={job.pipeline}")  # always: a config file may choose one
    if job.config in DOMAIN_CHANNELS:  # read at full precision; a neutral mean / std per channel
        channels = DOMAIN_CHANNELS[job.config]
        overrides += [f"data.channels={channels}", f"data.mean=[{','.join(['0.5'] * channels)}]"]
        overrides.append(f"data.std=[{','.join(['0.25'] * channels)}]")
    return load_config(CONFIG_FILES[job.config], overrides)


# --- measurements (in the subprocess) -------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replace_workers(cfg, workers: int):  # type: ignore[no-untyped-def]
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))


def _patch_loop(loop, synthetic_batch=None) -> None:  # type: ignore[no-untyped-def]
    """No checkpoints; with ``synthetic_batch``, a loader that repeats it (and the real dataset, for its size)."""
    loop._save = lambda *args, **kwargs: None
    if synthetic_batch is None:
        return
    real = loop.build_train_loader

    def build(cfg, *args, **kwargs):  # type: ignore[no-untyped-def]
        _, dataset = real(replace_workers(cfg, 0), *args, **kwargs)
        return itertools.repeat(synthetic_batch), dataset

    loop.build_train_loader = build


def first_batch(cfg):  # type: ignore[no-untyped-def]
    from ibot.data.loaders import build_train_loader

    loader, _ = build_train_loader(replace_workers(cfg, 0))
    return next(iter(loader))


def synthetic_batch(cfg):  # type: ignore[no-untyped-def]
    """One finished batch (float crops) to repeat, cut by the device pipeline: PIL takes a minute
    for a GPU-sized batch in one process."""
    from ibot.data.photometric import DeviceAugment

    device_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pipeline="device"))
    return DeviceAugment(device_cfg.data)(first_batch(device_cfg))


def steady_state(rows: list[dict], warmup: int, batch: int) -> tuple[float, float]:
    """(images/s, time-weighted mean data-wait share) over the log windows that start at or after ``warmup``."""
    images = seconds = waited = 0.0
    previous = 0
    for row in rows:
        window_images = (row["step"] - previous) * batch
        if previous >= warmup:
            window_seconds = window_images / row["images_per_second"]
            images += window_images
            seconds += window_seconds
            waited += row["data_wait_share"] * window_seconds
        previous = row["step"]
    if seconds == 0:
        raise SystemExit(f"no log window after the {warmup} warm-up steps: raise --steps")
    return images / seconds, waited / seconds


def measure_training(job: Job, options: Options) -> dict:
    """``train(cfg)`` on the folder, or on one repeated batch (``synthetic``); its steady state."""
    import ibot.train.loop as loop
    from ibot.runtime import Runtime
    from ibot.train.metrics import read_metrics

    with tempfile.TemporaryDirectory(prefix="ibot-input-") as out:
        cfg = build_config(job, options, out)
        _patch_loop(loop, synthetic_batch(cfg) if job.kind == "synthetic" else None)
        loop.train(cfg, progress=False)
        rows = read_metrics(Path(out) / "metrics.jsonl")
    images_per_s, wait = steady_state(rows, warmup_steps(job.workers, options), cfg.data.batch_size)
    return {"images_per_s": images_per_s, "wait": wait, "precision": Runtime.resolve(cfg.train).precision}


def measure_loader(job: Job, options: Options) -> dict:
    """The training DataLoader alone: whole rounds (one batch per worker) after the first, which holds the start."""
    from ibot.data.loaders import build_train_loader

    cfg = build_config(job, options, UNUSED_OUTPUT)
    if job.workers == 0:
        torch.set_num_threads(1)  # one core's rate
    loader, _ = build_train_loader(cfg)
    it = iter(loader)
    per_round = max(job.workers, 1)
    for _ in range(per_round):
        next(it)
    batches, start = 0, time.perf_counter()
    while batches < 2 * per_round or time.perf_counter() - start < options.loader_seconds:
        for _ in range(per_round):
            next(it)
        batches += per_round
    return {"images_per_s": batches * cfg.data.batch_size / (time.perf_counter() - start)}


def measure_augment(job: Job, options: Options) -> dict:
    """``DeviceAugment`` on one batch of uint8 crops already on the device, repeated for ~``loader_seconds``."""
    from ibot.data.photometric import DeviceAugment

    cfg = build_config(job, options, UNUSED_OUTPUT)
    device = torch.device(options.device)
    batch = first_batch(cfg).to(device)
    augment = DeviceAugment(cfg.data)
    for _ in range(2):
        augment(batch)
    _sync(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < options.loader_seconds:
        augment(batch)
        calls += 1
        if calls % 4 == 0:
            _sync(device)
    _sync(device)
    return {"images_per_s": calls * batch.batch_size / (time.perf_counter() - start)}


def worker(job: Job, options: Options) -> None:
    torch.manual_seed(0)
    if options.threads:
        torch.set_num_threads(options.threads)
    measure = {"loader": measure_loader, "augment": measure_augment}.get(job.kind, measure_training)
    print("RESULT " + json.dumps(measure(job, options)), flush=True)


# --- the driver ----------------------------------------------------------------------------


def run_job(job: Job, options: Options) -> dict | str:
    """The job's result, or why it failed (the last line of its stderr)."""
    payload = json.dumps({"job": dataclasses.asdict(job), "options": dataclasses.asdict(options)})
    done = subprocess.run([sys.executable, __file__, "--job", payload], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(lines[-1].removeprefix("RESULT "))


TRAINING_COLUMNS = ["config", "measurement", "pipeline", "workers", "batch", "precision", "images/s"]
TRAINING_COLUMNS += ["data wait", "vs synthetic"]
LOADER_COLUMNS = ["config", "pipeline", "part", "workers", "images/s", "images/s per core or worker process"]


def rate(images_per_s: float) -> str:
    """Images/s to 3 significant digits or more: a CPU's B step makes a fraction of one."""
    return f"{images_per_s:,.1f}" if images_per_s >= 10 else f"{images_per_s:.3g}"


def print_row(cells: list[object]) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def print_header(columns: list[str]) -> None:
    print_row(columns)
    print("|" + "---|" * len(columns))


def training_table(options: Options, pipelines: list[str]) -> dict[str, float]:
    """Synthetic and end-to-end rows for every config; returns each config's synthetic images/s."""
    print_header(TRAINING_COLUMNS)
    synthetic: dict[str, float] = {}
    for config in options.configs:
        batch = batch_size(config, options)
        base = run_job(Job("synthetic", config, "pil", 0), options)
        if isinstance(base, str):
            print_row([config, "synthetic", "-", "-", batch, "-", base, "-", "-"])
            continue
        synthetic[config] = base["images_per_s"]
        cells = [config, "synthetic", "-", "-", batch, base["precision"], rate(synthetic[config])]
        print_row(cells + [f"{base['wait']:.0%}", "1.00"])
        for pipeline, workers in itertools.product(pipelines, options.workers):
            r = run_job(Job("end-to-end", config, pipeline, workers), options)
            if isinstance(r, str):
                print_row([config, "end-to-end", pipeline, workers, batch, "-", r, "-", "-"])
                continue
            cells = [config, "end-to-end", pipeline, workers, batch, r["precision"], rate(r["images_per_s"])]
            print_row(cells + [f"{r['wait']:.0%}", f"{r['images_per_s'] / synthetic[config]:.2f}"])
    return synthetic


def loader_table(options: Options, pipelines: list[str]) -> dict[tuple[str, str], float]:
    """Loader-alone rows (and the device half's); returns the images/s of one core (0 workers, 1 thread)."""
    print_header(LOADER_COLUMNS)
    per_core: dict[tuple[str, str], float] = {}
    for config, pipeline in itertools.product(options.configs, pipelines):
        cut = "float32" if config in DOMAIN_CHANNELS else "uint8"
        part = "decode + crops + augment" if pipeline == "pil" else f"decode + {cut} crops"
        for workers in options.workers:
            r = run_job(Job("loader", config, pipeline, workers), options)
            if isinstance(r, str):
                print_row([config, pipeline, part, workers, r, "-"])
                continue
            each = r["images_per_s"] / max(workers, 1)
            if workers == 0:
                per_core[config, pipeline] = each
            print_row([config, pipeline, part, workers, rate(r["images_per_s"]), rate(each)])
        if pipeline == "device":
            r = run_job(Job("augment", config, pipeline, 0), options)
            made = r if isinstance(r, str) else rate(r["images_per_s"])
            print_row([config, pipeline, f"DeviceAugment on {options.device}", "-", made, "-"])
    return per_core


def headline(options: Options, synthetic: dict[str, float], per_core: dict[tuple[str, str], float]) -> None:
    """Config B's crops: images/s one CPU core makes, and the cores the step would need; the domain
    folders' rates per core against CIFAR-10's (RGB, the same crops)."""
    for (config, pipeline), core in per_core.items():
        rgb = per_core.get(("cifar", pipeline))
        if config in DOMAIN_CHANNELS and rgb:
            channels = DOMAIN_CHANNELS[config]
            print(
                f"headline: {config} ({channels} channel(s), full precision, {pipeline}): {rate(core)} images/s "
                f"per CPU core, {core / rgb:.2f}x RGB's {rate(rgb)} (cifar, the same crops)"
            )
    for pipeline in ("pil", "device"):
        core = per_core.get(("B", pipeline))
        if core is None:
            continue
        line = f"headline: config B crops (2 x 224 + 10 x 96, {pipeline}): {rate(core)} images/s per CPU core"
        if "B" in synthetic:
            need = synthetic["B"] / core
            line += f"; the step's {rate(synthetic['B'])} images/s ({options.device}) needs {need:.2f} cores to feed it"
        print(line)


def machine_line(options: Options) -> str:
    device = options.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name(torch.device(device))})"
    cores = f"CPU cores: {os.cpu_count()} (os.cpu_count), {len(os.sched_getaffinity(0))} usable (sched_getaffinity)"
    return f"{cores}; device {device}; torch {torch.__version__}"


def parse_options() -> Options | tuple[Job, Options]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Options()
    parser.add_argument("--configs", nargs="+", default=list(default.configs), choices=sorted(CONFIG_FILES))
    parser.add_argument("--pipelines", nargs="+", default=list(default.pipelines), choices=PIPELINES)
    parser.add_argument("--workers", nargs="+", type=int, default=list(default.workers))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=default.precision, choices=["auto", "fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=default.batch, help="0: cifar 64, B 8 on CPU / 256 on CUDA")
    parser.add_argument("--steps", type=int, default=default.steps, help="measured steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=default.warmup, help="0: workers + 1 steps, at least 2")
    parser.add_argument("--log-every", type=int, default=default.log_every, help="steps per metric window")
    parser.add_argument("--threads", type=int, default=default.threads)
    parser.add_argument("--loader-seconds", type=float, default=default.loader_seconds)
    parser.add_argument("--cifar", default=default.cifar, help="CIFAR-10 image folder (config cifar)")
    parser.add_argument("--folder", default="", help="ImageNet-like folder (config B; make_jpeg_folder.py)")
    parser.add_argument(
        "--domain", default="", help="png16/ and tiff5/ folder (configs png16, tiff5; make_domain_folder.py)"
    )
    parser.add_argument("--tables", nargs="+", default=list(default.tables), choices=list(default.tables))
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        payload = json.loads(args.job)
        options = payload["options"]
        for key in ("configs", "pipelines", "workers", "tables"):
            options[key] = tuple(options[key])
        return Job(**payload["job"]), Options(**options)
    if "B" in args.configs and not args.folder:
        parser.error("config B needs --folder (make one with benchmarks/make_jpeg_folder.py)")
    if set(args.configs) & set(DOMAIN_CHANNELS) and not args.domain:
        parser.error("configs png16 and tiff5 need --domain (make one with benchmarks/make_domain_folder.py)")
    fields = {f.name for f in dataclasses.fields(Options)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in fields}
    return Options(**values)


def main() -> None:
    parsed = parse_options()
    if isinstance(parsed, tuple):
        worker(*parsed)
        return
    options = parsed
    print(machine_line(options))
    pipelines = list(options.pipelines)
    print()
    synthetic = training_table(options, pipelines) if "training" in options.tables else {}
    print()
    per_core = loader_table(options, pipelines) if "loader" in options.tables else {}
    print()
    headline(options, synthetic, per_core)


if __name__ == "__main__":
    main()
