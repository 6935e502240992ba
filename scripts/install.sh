#!/usr/bin/env bash
# Install llava into ./.venv on a fresh machine, CPU torch pinned (constraints.txt) so no CUDA build is pulled.
#   bash scripts/install.sh            # runtime + test, megatron, qlora, bench (TRL peer of the benchmark), plot extras
#   EXTRAS=test,megatron,qlora bash scripts/install.sh
#   VENV=.venv-noplot EXTRAS=test,megatron,qlora,bench bash scripts/install.sh   # a second venv: tests without matplotlib
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test,megatron,qlora,bench,plot}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >/dev/null
"$VENV/bin/pip" install -q -c constraints.txt -e ".[${EXTRAS}]"
