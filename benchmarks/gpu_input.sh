#!/usr/bin/env bash
# The input pipeline on one GPU machine in one go (under 10 minutes): an ImageNet-like JPEG folder
# on the machine's disk, the CUDA tests, the device half (torch vs kornia) and nvJPEG, the CPU
# half per core, and config B at batch 256 bf16: synthetic step vs end to end, pil and device.
# Usage: bash benchmarks/gpu_input.sh [OUT_DIR]   (kornia from .whl/*.whl when that folder exists)
set -u
out=${1:-${OUT:-gpu_input}}
source "$(dirname "$0")/gpu_common.sh"
cores=$(python3 -c "import os; print(len(os.sched_getaffinity(0)))")
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "cores: $cores";
  python3 -c "import torch, torchvision, PIL; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'pillow', PIL.__version__)";
  lscpu | grep -i "model name"; } | tee "$out/machine.txt"

folder=/tmp/imagenet_like
step make 90 python3 benchmarks/make_jpeg_folder.py "$folder" --images 4096 --source data/cifar10_sample/train \
    --jobs "$cores"
step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step augment 100 python3 benchmarks/augment.py --folder "$folder" --device cuda --seconds 6
step input 270 python3 benchmarks/input.py --configs B --device cuda --precision bf16 --batch 256 \
    --folder "$folder" --workers $((cores - 1)) --steps 20 --loader-seconds 8
