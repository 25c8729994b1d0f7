#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest tests "$@"
