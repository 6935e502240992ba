"""Test driver: several ``llava train --backend megatron`` runs in one torchrun launch (megatron-core and
transformers are imported once; each run sets up and tears down its own model-parallel layout).

    torchrun --nproc_per_node 2 tests/megatron/megatron_train_jobs.py JOBS.json

``JOBS.json`` is a list of argv lists for ``llava train``; a job whose first element is ``"expect_error"`` must
raise (its message is written to ``<output_dir>/error.txt``). Used by ``test_megatron_train.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llava.train.train import train


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for argv in jobs:
        train(argv)


if __name__ == "__main__":
    main()
