"""Entry point for tests/train/test_param_groups.py: train, then write the optimizer's parameter groups as DeepSpeed
holds them (``<output_dir>/param_groups.json``: per group its lr, weight decay and parameter names).

    deepspeed --num_gpus 1 tests/train/param_groups_probe.py <training flags incl. --deepspeed config.json>
"""

from __future__ import annotations

import json
import os
import sys

from llava.train.distributed import finish_distributed_process
from llava.train.train import train


def main() -> None:
    trainer = train(sys.argv[1:])
    engine_optimizer = trainer.model_wrapped.optimizer  # DeepSpeedZeroOptimizer (ZeRO-2)
    names = {id(p): n for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
    groups = [{"lr": g["lr"], "weight_decay": g["weight_decay"], "names": sorted(names[id(p)] for p in params)}
              for g, params in zip(engine_optimizer.optimizer.param_groups, engine_optimizer.bit16_groups)]
    if trainer.args.process_index == 0:
        with open(os.path.join(trainer.args.output_dir, "param_groups.json"), "w") as f:
            json.dump({"groups": groups, "optimizer": type(engine_optimizer.optimizer).__name__}, f)
    finish_distributed_process()


if __name__ == "__main__":
    main()
