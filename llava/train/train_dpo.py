"""Preference tuning (DPO / IPO) with LLaVA-NeXT's flags: ``llava train --training_stage dpo`` under its own name.

    python -m llava.train.train_dpo --model_name_or_path SFT_RUN --version qwen_1_5 --data_path dpo.json \
        --image_folder images --dpo_alpha 1.0 --beta 0.1 --gamma 0 --output_dir out/dpo
    torchrun --nproc_per_node 8 llava/train/train_dpo.py --deepspeed scripts/zero3.json ...   # LLaVA-NeXT's path
    llava dpo ...                                                                             # the same

Records: ``{"id", "image" | "images" | "video", "prompt", "chosen", "rejected"}`` (LLaVA-NeXT's; a video with
``--video_folder``) or a conversation whose last gpt turn has ``chosen`` and ``rejected``
(``llava/data/preference_records.py``). The recipe is ``llava/train/train.py``'s (``build_dpo_trainer``); the
reference model, the loss and the metrics are ``llava/train/dpo_trainer.py``'s.
"""

from __future__ import annotations

import sys

from llava.errors import report_usage_errors
from llava.train.distributed import finish_distributed_process
from llava.train.train import train


def dpo_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``--training_stage dpo`` unless it names a stage itself (a YAML config file stays first)."""
    if any(a == "--training_stage" or a.startswith("--training_stage=") for a in argv):
        return list(argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        return [argv[0], "--training_stage", "dpo", *argv[1:]]
    return [*argv, "--training_stage", "dpo"]


def main() -> None:
    def run() -> int:
        train(dpo_argv(sys.argv[1:]))
        finish_distributed_process()
        return 0

    sys.exit(report_usage_errors("dpo", run))


if __name__ == "__main__":
    main()
