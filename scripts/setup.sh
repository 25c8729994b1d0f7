#!/usr/bin/env bash
# Install ibot and everything it needs into the current Python; safe to run again.
# TORCH_SPEC pins torch for this project's machines (their local wheels); override it elsewhere,
# e.g. TORCH_SPEC="torch torchvision" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
# shellcheck disable=SC2086
"$PYTHON" -m pip install --quiet --disable-pip-version-check $TORCH_SPEC
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
