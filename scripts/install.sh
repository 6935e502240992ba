#!/usr/bin/env bash
# Install llava into ./.venv on a fresh machine, CPU torch pinned (constraints.txt) so no CUDA build is pulled.
#   bash scripts/install.sh            # runtime + test, megatron, qlora, bench (TRL peer of the benchmark), plot extras
#   EXTRAS=test,megatron,qlora bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test,megatron,qlora,bench,plot}"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -c constraints.txt -e ".[${EXTRAS}]"
