#!/usr/bin/env bash
# Install (CPU torch pinned) and run the whole test suite. Called by .ci/run.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
.venv/bin/ruff check llava tests scripts playground
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
