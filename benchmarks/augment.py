"""Compare ways to run iBOT's multi-crop augmentation; prints markdown tables.

Device half (``--device cpu|cuda``): the photometric augmentations of config B's crops (2 x 224
+ 10 x 96 per image: flip, colour jitter p=0.8, grayscale p=0.2, blur, solarize, normalise)
applied batched to uint8 crops already on the device, by this package's hand-written torch
(``ibot.data.photometric``) and by ``kornia.augmentation`` (``pip install kornia``) with the
same probabilities and ranges.

CPU half, per core (one thread, one process): decode + crops from a JPEG folder by this
package's PIL pipeline (everything on the CPU), its device pipeline's CPU half (decode at
reduced size + uint8 crops), and an NVIDIA DALI CPU pipeline (``pip install
nvidia-dali-cuda130``) doing decode, the 12 random-resized crops and the photometric ops.

    python benchmarks/augment.py --folder /tmp/imagenet_like --device cpu
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch

from ibot.config import DataConfig
from ibot.data.photometric import Photometric, blur_kernel_size, crop_kinds, draw_photometric

CONFIG_B = DataConfig(pipeline="device")  # the official crops: 2 x 224 + 10 x 96


def _crops(images: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random uint8 crops of ``images`` images and their parameter rows, per crop size."""
    rng = random.Random(0)
    first, second, local = crop_kinds(CONFIG_B)
    global_params = [draw_photometric(CONFIG_B, k, rng) for _ in range(images) for k in (first, second)]
    local_params = [draw_photometric(CONFIG_B, local, rng) for _ in range(images * CONFIG_B.num_local_crops)]
    out = []
    for size, rows in ((CONFIG_B.global_crop_size, global_params), (CONFIG_B.local_crop_size, local_params)):
        pixels = torch.randint(0, 256, (len(rows), 3, size, size), dtype=torch.uint8, device=device)
        out.append((pixels, torch.tensor(rows)))
    return out


def _kornia(size: int, blur_prob: float, solarize_prob: float) -> torch.nn.Module:
    import kornia.augmentation as K

    b, c, s, h = CONFIG_B.color_jitter
    kernel = blur_kernel_size(size)
    return torch.nn.Sequential(
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(b, c, s, h, p=CONFIG_B.color_jitter_prob),
        K.RandomGrayscale(p=CONFIG_B.grayscale_prob),
        K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=blur_prob),
        K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_prob),
        K.Normalize(torch.tensor(CONFIG_B.mean), torch.tensor(CONFIG_B.std)),
    )


def _time(fn, device: str, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def device_half(images: int, device: str, repeats: int) -> None:
    (g, gp), (loc, lp) = _crops(images, device)
    ours = Photometric(CONFIG_B)
    rows = [("torch (ibot.data.photometric)", lambda: (ours(g, gp), ours(loc, lp)))]
    try:
        first, second, local = crop_kinds(CONFIG_B)
        # kornia draws one parameter set per crop itself; global crops 1 and 2 differ in blur
        # and solarize, so each half of the global batch gets its own pipeline.
        k1 = _kornia(CONFIG_B.global_crop_size, first.blur_prob, first.solarize_prob).to(device)
        k2 = _kornia(CONFIG_B.global_crop_size, second.blur_prob, second.solarize_prob).to(device)
        kl = _kornia(CONFIG_B.local_crop_size, local.blur_prob, local.solarize_prob).to(device)
        half = len(g) // 2
        rows.append(
            (
                "kornia.augmentation",
                lambda: (k1(g[:half].float() / 255), k2(g[half:].float() / 255), kl(loc.float() / 255)),
            )
        )
    except ImportError:
        print("kornia not installed: pip install -e .[bench]")
    print(f"\n| device half, config B crops, {images} images | device | images/s |\n|---|---|---|")
    for name, fn in rows:
        print(f"| {name} | {device} | {images / _time(fn, device, repeats):.0f} |", flush=True)


def _loader_rate(transform, files: list[str], seconds: float) -> float:  # type: ignore[no-untyped-def]
    from ibot.data.datasets import decode_view

    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        path = files[done % len(files)]
        decode_view(transform, path, path, 0, seed=done)
        done += 1
    return done / (time.perf_counter() - t)


def _dali_rate(files: list[str], batch: int, batches: int) -> float:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    cfg = CONFIG_B
    b, c, s, h = cfg.color_jitter
    scale = [[255 * m for m in cfg.mean], [255 * d for d in cfg.std]]

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():  # type: ignore[no-untyped-def]
        jpegs, _ = fn.readers.file(files=files, random_shuffle=True, seed=0)
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        outs = []
        for i in range(2 + cfg.num_local_crops):
            size, area = (
                (cfg.global_crop_size, cfg.global_crop_scale) if i < 2 else (cfg.local_crop_size, cfg.local_crop_scale)
            )
            crop = fn.random_resized_crop(
                images, size=[size, size], random_area=list(area), interp_type=types.INTERP_CUBIC
            )
            crop = fn.color_twist(
                crop,
                brightness=fn.random.uniform(range=[1 - b, 1 + b]),
                contrast=fn.random.uniform(range=[1 - c, 1 + c]),
                saturation=fn.random.uniform(range=[1 - s, 1 + s]),
                hue=fn.random.uniform(range=[-360 * h, 360 * h]),
            )
            crop = fn.gaussian_blur(crop, sigma=fn.random.uniform(range=[0.1, 2.0]), window_size=blur_kernel_size(size))
            mirror = fn.random.coin_flip()
            outs.append(fn.crop_mirror_normalize(crop, mirror=mirror, dtype=types.FLOAT, mean=scale[0], std=scale[1]))
        return tuple(outs)

    p = pipe()
    p.build()
    p.run()
    t = time.perf_counter()
    for _ in range(batches):
        p.run()
    return batches * batch / (time.perf_counter() - t)


def nvjpeg(folder: str, batch: int, repeats: int) -> None:
    """Batched full-size JPEG decode on the GPU (``torchvision.io.decode_jpeg(device="cuda")``)."""
    from torchvision.io import decode_jpeg, read_file

    from ibot.data.datasets import ImageFolderIndex

    files = list(ImageFolderIndex.scan(folder).paths)[:batch]
    data = [read_file(f) for f in files]
    seconds = _time(lambda: decode_jpeg(data, device="cuda"), "cuda", repeats)
    print(f"\n| nvJPEG, {len(data)} files per call, full size | images/s |\n|---|---|")
    print(f"| decode only | {len(data) / seconds:.0f} |")


def cpu_half(folder: str, seconds: float) -> None:
    from ibot.data.crop_plan import DeviceMultiCrop
    from ibot.data.datasets import ImageFolderIndex
    from ibot.data.transforms import MultiCropTransform

    torch.set_num_threads(1)
    files = list(ImageFolderIndex.scan(folder).paths)
    print(f"\n| CPU half, config B crops, one core ({len(files)} files in {folder}) | images/s per core |\n|---|---|")
    pil = _loader_rate(MultiCropTransform(CONFIG_B), files, seconds)
    print(f"| PIL pipeline (all augmentations on the CPU) | {pil:.1f} |")
    device = _loader_rate(DeviceMultiCrop(CONFIG_B), files, seconds)
    print(f"| device pipeline, CPU half (reduced decode + uint8 crops) | {device:.1f} |")
    try:
        rate = _dali_rate(files, batch=16, batches=max(2, int(seconds)))
        print(f"| DALI CPU pipeline (decode + crops + photometric, 1 thread) | {rate:.1f} |")
    except ImportError:
        print("| DALI CPU pipeline | not installed: pip install -e .[dali] |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="a JPEG folder (benchmarks/make_jpeg_folder.py) for the CPU half")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=0, help="images per device batch (default 8 on CPU, 256 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per CPU-half row")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"torch {torch.__version__}, {cores} cores, device {args.device}")
    if args.device == "cpu":
        torch.set_num_threads(1)  # the device half per core, comparable with the CPU half
    device_half(args.images or (256 if args.device.startswith("cuda") else 8), args.device, args.repeats)
    if args.folder and args.device.startswith("cuda"):
        nvjpeg(str(Path(args.folder)), 256, args.repeats)
    if args.folder:
        cpu_half(str(Path(args.folder)), args.seconds)


if __name__ == "__main__":
    main()
