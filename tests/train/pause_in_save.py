"""Test entry point: ``llava.train.train`` with a pause in the middle of saving one checkpoint, to kill it there.

    python -m pause_in_save --pause_in_save STEP:SECONDS <training flags>        # tests/train on PYTHONPATH
    deepspeed --num_gpus 2 --module pause_in_save --pause_in_save STEP:SECONDS <flags>   # every rank pauses

While checkpoint STEP is being written (inside ``checkpoint-STEP.tmp/``), after the weights and
``llava_args.json`` and before the optimizer, scheduler and trainer state, the save leaves a marker file
``checkpoint-STEP.tmp/checkpoint-STEP/PAUSED`` and sleeps SECONDS: the test kills the process when the marker
appears. The hook lives here, with the tests that use it (``tests/train/test_bad_samples.py``,
``tests/train/test_distributed.py``); the product's trainer knows nothing of it.
"""

from __future__ import annotations

import os
import sys
import time


def install_pause(step: int, seconds: float) -> None:
    """Wrap ``LLaVATrainer.save_model`` in this process so the save of checkpoint ``step`` pauses."""
    from llava.train.trainer import LLaVATrainer

    save_model = LLaVATrainer.save_model

    def pausing_save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        save_model(self, output_dir, _internal_call=_internal_call)
        staged = output_dir and os.path.basename(os.path.dirname(output_dir)).endswith(".tmp")
        if staged and self.state.global_step == step:
            open(os.path.join(output_dir, "PAUSED"), "w").close()
            time.sleep(seconds)

    LLaVATrainer.save_model = pausing_save_model


def main(argv: list[str]) -> None:
    """Take ``--pause_in_save STEP:SECONDS`` out of ``argv`` (anywhere: a launcher may put ``--local_rank`` first),
    install the pause, train with the rest."""
    at = argv.index("--pause_in_save")
    step, seconds = argv[at + 1].split(":")
    install_pause(int(step), float(seconds))
    from llava.train.distributed import finish_distributed_process
    from llava.train.train import train

    train(argv[:at] + argv[at + 2:])
    finish_distributed_process()


if __name__ == "__main__":
    main(sys.argv[1:])
