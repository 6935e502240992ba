"""Shared helpers of the Megatron tests (``megatron_models``, ``megatron_harness``, ``megatron_train_jobs``) live in
this folder; its tests live in ``converter/`` and ``backend/`` (mirroring ``llava/megatron/``), so this folder is put
on ``sys.path`` for them to import the helpers by name."""

import sys
from pathlib import Path

HELPERS = str(Path(__file__).resolve().parent)
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)
