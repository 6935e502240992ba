"""The shipped DeepSpeed configs, as the installed DeepSpeed reads them after transformers fills the "auto" values.

(The configs are trained with end to end by tests/train/test_distributed.py; this file checks what they say.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ZERO_CONFIGS = Path(__file__).resolve().parents[2] / "zero_configs"


@pytest.mark.parametrize("name,stage,offload", [("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False),
                                                ("zero3_offload", 3, True)])
def test_zero_config_as_deepspeed_reads_it(name, stage, offload, tmp_path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from llava.train.args import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(ZERO_CONFIGS / f"{name}.json"),
                             per_device_train_batch_size=3, gradient_accumulation_steps=2, learning_rate=1e-4)
    config = args.hf_deepspeed_config.config
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 3 * 2 * args.world_size
    zero = DeepSpeedZeroConfig(**config["zero_optimization"])
    assert zero.stage == stage
    assert zero.gather_16bit_weights_on_model_save is (stage == 3)  # the final save writes gathered 16-bit weights
    assert (zero.offload_optimizer is not None and zero.offload_optimizer.device == "cpu") is offload
    assert (zero.offload_param is not None and zero.offload_param.device == "cpu") is offload
    if offload:
        assert config["optimizer"]["params"]["lr"] == 1e-4
    text = json.loads((ZERO_CONFIGS / f"{name}.json").read_text())
    assert text["_comment"].split("Run: ")[1].startswith("deepspeed")  # every config names the command that runs it
