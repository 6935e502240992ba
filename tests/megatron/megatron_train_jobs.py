"""Test driver: several ``llava train --backend megatron`` runs in one torchrun launch (megatron-core and
transformers are imported once; each run sets up and tears down its own model-parallel layout).

    torchrun --nproc_per_node 2 tests/megatron/megatron_train_jobs.py JOBS.json

``JOBS.json`` is a list of argv lists for ``llava train``; a job whose first element is ``"expect_error"`` must
raise (its message is written to ``<output_dir>/error.txt``). Used by ``test_megatron_train.py``.

With ``LLAVA_TEST_PAUSE_IN_SAVE=STEP:SECONDS`` in the environment, the save of checkpoint STEP pauses after every
rank staged its weights (before the optimizer state), leaving ``checkpoint-STEP.tmp/PAUSED`` for the test to kill
on and ``PID_<rank>`` files naming the ranks to kill (torchrun starts them in sessions of their own, so killing
torchrun's process group leaves them running); the product's checkpoint code knows nothing of it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from llava.train.distributed import finish_distributed_process
from llava.train.train import train


def install_pause(step: int, seconds: float) -> None:
    """Wrap the checkpoint's weight writer in this process: checkpoint ``step`` pauses once its weights are staged."""
    import torch

    from llava.megatron.backend import megatron_checkpoint as checkpoint

    write_rank_shards = checkpoint.write_rank_shards

    def pausing_write(staging, *args, **kwargs):
        write_rank_shards(staging, *args, **kwargs)
        if Path(staging).name == f"checkpoint-{step}.tmp":
            (Path(staging) / f"PID_{torch.distributed.get_rank()}").write_text(str(os.getpid()))
            torch.distributed.barrier()  # every rank's PID is on disk before the test sees PAUSED
            if torch.distributed.get_rank() == 0:
                (Path(staging) / "PAUSED").write_text("")
            time.sleep(seconds)

    checkpoint.write_rank_shards = pausing_write


def main() -> None:
    if os.environ.get("LLAVA_TEST_PAUSE_IN_SAVE"):
        step, seconds = os.environ["LLAVA_TEST_PAUSE_IN_SAVE"].split(":")
        install_pause(int(step), float(seconds))
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for argv in jobs:
        train(argv)
    finish_distributed_process()


if __name__ == "__main__":
    main()
