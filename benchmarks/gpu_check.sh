#!/usr/bin/env bash
# The CUDA checks of one GPU machine in one go (a few minutes): the CUDA tests, the step
# benchmark of both configurations beside lightly, config B at a GPU-sized batch, the CLI.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (lightly from .whl/*.whl when that folder exists)
set -u
out=${1:-${OUT:-gpu_check}}
source "$(dirname "$0")/gpu_common.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/gpu.txt"

step tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step bench 240 python3 benchmarks/step.py --configs A B --impls ibot lightly --precisions fp32 bf16 \
    --steps 10 --warmup 3 --data-workers 0 4 8
for batch in 64 256; do
    step "bench_b$batch" 100 python3 benchmarks/step.py --configs B --batch $batch --impls ibot lightly \
        --precisions bf16 --steps 10 --warmup 3 --data-workers
done
step bench_b256_compile 120 python3 benchmarks/step.py --configs B --batch 256 --impls ibot --precisions bf16 \
    --compile --steps 8 --warmup 4 --data-workers
step bench_fp16_compile 240 python3 benchmarks/step.py --configs A B --impls ibot --precisions fp16 bf16 \
    --compile --steps 10 --warmup 5 --data-workers
