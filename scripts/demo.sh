#!/usr/bin/env bash
# Set up, then pre-train on the embedded CIFAR-10 sample and compare k-NN with a random init.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m ibot demo "$@"
