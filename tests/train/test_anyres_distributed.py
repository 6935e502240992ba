"""anyres under two processes (DeepSpeed ZeRO-3 on CPU, gloo): each rank's batch has its own number of crops per image.

    .venv/bin/pytest tests/train/test_anyres_distributed.py

2 processes x batch 2 give the same per-step losses as 1 process x batch 4 (1e-5); a resumed run repeats the
uninterrupted losses; the saved checkpoint is a whole LlavaNext (no empty ZeRO-3 shards) with the trained newline.
"""

from __future__ import annotations

import json

import pytest
from distributed_probe import assert_zero3_two_ranks_match_one_process
from transformers import LlavaNextForConditionalGeneration

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_zero3_anyres_two_ranks_match_one_process_and_resume(tiny_models, anyres_data, tmp_path):
    records = [r for r in json.loads(anyres_data["train"].read_text()) if "image" in r or "images" in r]
    data = tmp_path / "images_only.json"  # ZeRO-3 needs every rank to run the tower in a step (one modality a step)
    data.write_text(json.dumps(records))
    out = tmp_path / "zero3_anyres"

    def flags(out_dir, batch):
        return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
                "--version", "vicuna_v1", "--data_path", str(data), "--image_folder", str(anyres_data["image_folder"]),
                "--image_aspect_ratio", "anyres", "--image_grid_pinpoints", "(1x1),...,(3x3)",
                "--mm_patch_merge_type", "spatial_unpad", "--output_dir", str(out_dir), "--max_steps", "4",
                "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-3", "--logging_steps", "1",
                "--save_steps", "2", "--report_to", "none", "--model_max_length", "1024", "--seed", "0"]

    assert_zero3_two_ranks_match_one_process(flags, out, tmp_path / "single", LlavaNextForConditionalGeneration)
