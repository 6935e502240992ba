#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the tiny end-to-end demo
# (synthetic data -> tiny CLIP + Llama -> stage 1 -> stage 2 -> held-out accuracy table). ~5 min on 2 CPU cores.
#   bash scripts/demo.sh [--workdir demo_workdir]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/install.sh
WANDB_MODE="${WANDB_MODE:-offline}" .venv/bin/llava demo "$@"
