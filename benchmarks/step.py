"""Benchmark the full iBOT training step and the input pipeline; prints markdown tables.

Each (implementation, configuration, precision) runs in its own subprocess so that peak
memory is that run's alone. "ibot" is this package; "lightly" is the same step built from
lightly's modules (``pip install lightly``), timed under the same conditions.

    python benchmarks/step.py                       # configs A and B, fp32 and bf16, both impls
    python benchmarks/step.py --configs A --impls ibot --precisions bf16 --steps 10

FLOPs are counted with the formula of the reference notes (forward MACs per crop =
L (12 N D^2 + 2 N^2 D) + N_p 3 P^2 D, heads on [cls] and masked tokens, backward = 2x
forward for the student, x2 FLOPs per MAC); MFU is against the matmul peak measured in the
same run for the same dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch

MASKED_FRACTION = 0.5 * 0.3  # iBOT: half the global crops masked, mean ratio 0.3


@dataclass(frozen=True)
class Spec:
    arch: str
    patch: int
    global_size: int
    local_size: int
    num_local: int
    batch: int
    out_dim: int


CONFIGS = {
    "A": Spec("vit_tiny", 4, 32, 16, 6, 64, 8192),
    "B": Spec("vit_small", 16, 224, 96, 10, 8, 8192),
}


@dataclass(frozen=True)
class StepOptions:
    """This package's step options (the lightly-built step takes them and ignores them)."""

    attention: str = "auto"
    compile: bool = False
    checkpointing: bool = False
    residual: str = "auto"  # train.residual_precision


DIMS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def gflops_per_image(spec: Spec, head_hidden: int = 2048, bottleneck: int = 256, head_layers: int = 3) -> float:
    """Useful training FLOPs per image per step (teacher fwd + student fwd/bwd, heads included)."""
    dim, depth, _ = DIMS[spec.arch]

    def backbone_macs(size: int) -> float:
        patches = (size // spec.patch) ** 2
        n = patches + 1
        return depth * (12 * n * dim**2 + 2 * n**2 * dim) + patches * 3 * spec.patch**2 * dim

    head_macs = (
        dim * head_hidden + head_hidden**2 * (head_layers - 2) + head_hidden * bottleneck + bottleneck * spec.out_dim
    )
    masked_tokens = 2 * (spec.global_size // spec.patch) ** 2 * MASKED_FRACTION
    teacher = 2 * backbone_macs(spec.global_size) + (2 + masked_tokens) * head_macs
    student = (
        2 * backbone_macs(spec.global_size)
        + spec.num_local * backbone_macs(spec.local_size)
        + (2 + spec.num_local + masked_tokens) * head_macs
    )
    return 2 * (teacher + 3 * student) / 1e9


def measure_matmul_peak(dtype: torch.dtype, device: str) -> float:
    """Best GFLOP/s over square GEMMs and ViT MLP-shaped GEMMs (a GPU needs the large square one)."""
    best = 0.0
    shapes = [(4096, 4096, 4096), (8192, 384, 1536), (8192, 1536, 384), (8320, 192, 768)]
    if device.startswith("cuda"):
        shapes.append((8192, 8192, 8192))
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(2):
            a @ b
        reps = 20 if device.startswith("cuda") else 5
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_batches(spec: Spec, device: str, count: int):  # type: ignore[no-untyped-def]
    """``count`` batches of the same random crops, each with its own iBOT masks from this package's
    generator: the masked-token count changes from step to step, as in training (the work is the
    same for every impl)."""
    import random
    from dataclasses import replace as with_mask

    from ibot.config import MaskConfig
    from ibot.data.collate import Batch
    from ibot.data.masking import BlockMaskGenerator, sample_mask_ratio

    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    grid = spec.global_size // spec.patch
    gen = BlockMaskGenerator(grid, grid)

    def masks() -> dict[str, torch.Tensor]:  # with their flat indices, made by the loader in training
        mask = torch.stack(
            [
                gen(int(round(sample_mask_ratio(MaskConfig(), rng) * grid * grid)), rng).flatten()
                for _ in range(2 * spec.batch)
            ]
        )
        return {"mask": mask, "mask_indices": mask.flatten().nonzero().flatten()}

    batch = Batch(
        global_crops=torch.randn(2 * spec.batch, 3, spec.global_size, spec.global_size, generator=g),
        local_crops=torch.randn(spec.num_local * spec.batch, 3, spec.local_size, spec.local_size, generator=g),
        labels=torch.zeros(spec.batch, dtype=torch.long),
        **masks(),
    ).to(device)
    return [batch] + [with_mask(batch, **masks()).to(device) for _ in range(count - 1)]


def build_ibot_step(  # type: ignore[no-untyped-def]
    spec: Spec, precision: str, device: str, options: StepOptions
):
    from ibot.config import load_config
    from ibot.method import IBOT
    from ibot.runtime import Runtime
    from ibot.train.optim import build_optimizer, clip_and_step, set_lr_wd

    cfg = load_config(
        None,
        [
            f"model.arch={spec.arch}",
            f"model.patch_size={spec.patch}",
            f"model.out_dim={spec.out_dim}",
            f"data.global_crop_size={spec.global_size}",
            f"data.local_crop_size={spec.local_size}",
            f"data.num_local_crops={spec.num_local}",
            f"data.batch_size={spec.batch}",
            f"train.precision={precision}",
            f"train.device={device}",
            f"train.attention={options.attention}",
            "model.drop_path_rate=0.0",
            f"train.compile={options.compile}",
            f"train.residual_precision={options.residual}",
        ],
    )
    run = Runtime.resolve(cfg.train)
    method = IBOT(cfg.model, cfg.loss, spec.global_size).to(run.device)
    method.use_runtime(run)
    method.set_activation_checkpointing(options.checkpointing)
    if cfg.train.compile:
        method.compile_backbones()
    method.train()
    optimizer = build_optimizer(method, cfg.optim, run.device)
    set_lr_wd(optimizer, 1e-4, 0.04)
    scaler = torch.amp.GradScaler("cuda") if run.use_scaler else None
    clip_sets = [list(m.parameters()) for m in method.student.values()]

    def step(batch) -> None:  # type: ignore[no-untyped-def]
        with run.autocast():
            out = method(batch, teacher_temp=0.04)
        (scaler.scale(out.total) if scaler else out.total).backward()
        clip_and_step(optimizer, scaler, clip_sets, 3.0, False)
        method.update_teacher(0.996)

    labels = [run.attention] + (["bf16 residual"] if run.residual_dtype is torch.bfloat16 else [])
    labels += (["compile"] if options.compile else []) + (["ckpt"] if options.checkpointing else [])
    return step, " +".join(labels)


def build_lightly_step(  # type: ignore[no-untyped-def]
    spec: Spec, precision: str, device: str, options: StepOptions
):
    """The iBOT step as lightly's example composes it from its modules (shared head, K prototypes)."""
    import copy

    from lightly.loss import DINOLoss, IBOTPatchLoss
    from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import update_momentum
    from timm.models.vision_transformer import VisionTransformer

    dim, depth, heads = DIMS[spec.arch]
    vit = VisionTransformer(
        img_size=spec.global_size,
        patch_size=spec.patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=0,
        dynamic_img_size=True,
    )
    student = MaskedVisionTransformerTIMM(vit=vit).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    student_head = DINOProjectionHead(dim, 2048, 256, spec.out_dim, norm_last_layer=False).to(device)
    teacher_head = DINOProjectionHead(dim, 2048, 256, spec.out_dim).to(device).requires_grad_(False).eval()
    dino_loss = DINOLoss(output_dim=spec.out_dim, teacher_temp=0.07).to(device)
    ibot_loss = IBOTPatchLoss(output_dim=spec.out_dim, teacher_temp=0.07).to(device)
    params = list(student.parameters()) + list(student_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device_type = torch.device(device).type
    grid = spec.global_size // spec.patch
    views = 2 + spec.num_local

    def step(batch) -> None:  # type: ignore[no-untyped-def]
        mask = torch.zeros(batch.global_crops.shape[0], grid * grid + 1, dtype=torch.bool, device=device)
        mask[:, 1:] = batch.mask
        ctx = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else torch.autocast(device_type, enabled=False)
        with ctx:
            with torch.no_grad():
                t_feat = teacher.encode(batch.global_crops)
                t_cls = teacher_head(t_feat[:, 0])
                t_patch = teacher_head(t_feat[mask])
            s_feat = student.encode(batch.global_crops, mask=mask)
            s_cls = student_head(s_feat[:, 0])
            s_patch = student_head(s_feat[mask])
            s_local = student_head(student.encode(batch.local_crops)[:, 0])
            loss = dino_loss(
                teacher_out=list(t_cls.float().chunk(2)),
                student_out=list(torch.cat([s_cls, s_local]).float().chunk(views)),
                teacher_temp=0.04,
            ) + ibot_loss(
                teacher_out=t_patch.float(),
                student_out=s_patch.float(),
                mask=batch.mask.view(-1, grid, grid),
                teacher_temp=0.04,
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        optimizer.zero_grad()
        update_momentum(student, teacher, 0.996)
        update_momentum(student_head, teacher_head, 0.996)

    return step, "timm default"


def _spec(config: str, batch: int) -> Spec:
    """Configuration ``config``, at ``batch`` images per step when that is set (> 0)."""
    return replace(CONFIGS[config], batch=batch) if batch > 0 else CONFIGS[config]


def worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = _spec(args.config, args.batch)
    rss_start = _rss_mb()
    build = build_ibot_step if args.impl == "ibot" else build_lightly_step
    options = StepOptions(args.attention, args.compile, args.checkpointing, args.residual)
    step, attention = build(spec, args.precision, args.device, options)
    batches = make_batches(spec, args.device, args.warmup + args.steps)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for batch in batches:
        _sync(args.device)
        t = time.perf_counter()
        step(batch)
        _sync(args.device)
        times.append(time.perf_counter() - t)
    median = statistics.median(times[args.warmup :])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "impl": args.impl,
        "config": args.config,
        "precision": args.precision,
        "attention": attention,
        "step_s": median,
        "images_per_s": spec.batch / median,
        "rss_start_mb": rss_start,
        "peak_rss_mb": peak_rss,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None,
    }
    print("RESULT " + json.dumps(result))


def data_pipeline(spec_name: str, workers: int, batches: int) -> float:
    """Crops + masks per second from the embedded sample (images upscaled for config B)."""
    from torch.utils.data import DataLoader

    from ibot.config import load_config
    from ibot.data.collate import MultiCropCollate
    from ibot.data.datasets import ImageFolder
    from ibot.data.loaders import InfiniteSampler
    from ibot.data.transforms import MultiCropTransform

    spec = CONFIGS[spec_name]
    cfg = load_config(
        None,
        [
            f"data.global_crop_size={spec.global_size}",
            f"data.local_crop_size={spec.local_size}",
            f"data.num_local_crops={spec.num_local}",
            f"model.patch_size={spec.patch}",
        ],
    )
    root = os.path.join(os.path.dirname(__file__), "..", "data", "cifar10_sample", "train")
    dataset = ImageFolder(root, MultiCropTransform(cfg.data))
    loader = DataLoader(
        dataset,
        batch_size=spec.batch,
        sampler=InfiniteSampler(len(dataset)),
        num_workers=workers,
        collate_fn=MultiCropCollate(cfg.mask, spec.global_size // spec.patch),
    )
    it = iter(loader)
    # Drain what the workers prefetched while starting (2 batches each), then time the steady state.
    for _ in range(2 * workers + 1):
        next(it)
    batches = max(batches, 4 * workers)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * spec.batch / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["A", "B"], choices=sorted(CONFIGS))
    parser.add_argument("--impls", nargs="+", default=["ibot", "lightly"], choices=["ibot", "lightly"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "explicit"], help="ibot only")
    parser.add_argument("--compile", action="store_true", help="ibot only: torch.compile the backbones")
    parser.add_argument("--checkpointing", action="store_true", help="ibot only: activation checkpointing")
    parser.add_argument(
        "--residual", default="auto", choices=["auto", "fp32", "amp"], help="ibot only: train.residual_precision"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="images per step for every config (default: its own)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--data-workers", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--data-batches", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"device: {args.device}, torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}")
    peaks = {
        p: measure_matmul_peak({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[p], args.device)
        for p in args.precisions
    }
    print("matmul peak measured now: " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()))
    print()
    columns = ["config", "batch", "impl", "precision", "attention", "step s", "images/s", "GFLOP/img", "GFLOP/s", "MFU"]
    columns += ["peak memory MB", "RSS after import MB"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for config in args.configs:
        spec = _spec(config, args.batch)
        batch, flops = spec.batch, gflops_per_image(spec)
        for precision in args.precisions:
            for impl in args.impls:
                cmd = (
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        "--impl",
                        impl,
                        "--config",
                        config,
                        "--precision",
                        precision,
                        "--device",
                        args.device,
                        "--steps",
                        str(args.steps),
                        "--warmup",
                        str(args.warmup),
                        "--batch",
                        str(args.batch),
                        "--threads",
                        str(args.threads),
                        "--attention",
                        args.attention,
                        "--residual",
                        args.residual,
                    ]
                    + (["--compile"] if args.compile and impl == "ibot" else [])
                    + (["--checkpointing"] if args.checkpointing and impl == "ibot" else [])
                )
                done = subprocess.run(cmd, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    err = (done.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"| {config} | {batch} | {impl} | {precision} | - | failed: {err} |")
                    continue
                r = json.loads(lines[-1][len("RESULT ") :])
                achieved = flops * r["images_per_s"]
                memory = r["cuda_peak_mb"] if r["cuda_peak_mb"] is not None else r["peak_rss_mb"]
                cells = [
                    config,
                    str(batch),
                    impl,
                    precision,
                    r["attention"],
                    f"{r['step_s']:.3f}",
                    f"{r['images_per_s']:.1f}",
                ]
                cells += [f"{flops:.2f}", f"{achieved:.0f}", f"{100 * achieved / peaks[precision]:.1f} %"]
                cells += [f"{memory:.0f}", f"{r['rss_start_mb']:.0f}"]
                print("| " + " | ".join(cells) + " |", flush=True)
    if args.data_workers:
        print()
        print("| config | data workers | images/s (2 global + n local crops + masks) |")
        print("|---|---|---|")
        for config in args.configs:
            for workers in args.data_workers:
                print(f"| {config} | {workers} | {data_pipeline(config, workers, args.data_batches):.0f} |", flush=True)


if __name__ == "__main__":
    main()
