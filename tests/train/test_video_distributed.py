"""Video under two processes (DeepSpeed ZeRO-3 on CPU, gloo): a mix of video, image, multi-image and text records.

    .venv/bin/pytest tests/train/test_video_distributed.py

2 processes x batch 2 give the same per-step losses as 1 process x batch 4 (1e-5) and a resumed run repeats the
uninterrupted losses; the saved checkpoint is a whole LlavaOnevision. ``--group_by_modality_length`` keeps each
optimizer step to one modality (video its own), so under ZeRO-3 every rank runs the same tower path in a step.
"""

from __future__ import annotations

import json

import pytest
from distributed_probe import assert_zero3_two_ranks_match_one_process
from transformers import LlavaOnevisionForConditionalGeneration

from tests.data.video_clips import write_video_corpus

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_zero3_video_mix_two_ranks_match_one_process_and_resume(tiny_models, tmp_path):
    corpus = write_video_corpus(tmp_path / "corpus", n_videos=4)  # v0..v3 (v1 a frames directory), i0..i2, mix
    by_id = {r["id"]: r for r in corpus["records"]}
    two = {"id": "two", "images": ["img1.png", "img2.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nSame colour?"}, {"from": "gpt", "value": "no"}]}
    texts = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": w}]}
             for i, w in enumerate(("hi", "yes", "no", "ok"))]
    # 4 with a video, 4 with images (one with two), 4 text, 4 with an image and a video: whole steps of one modality
    # (under ZeRO-3 every rank of a step runs the same tower path; --group_by_modality_length keeps them apart)
    mixes = [{**by_id["mix"], "id": f"mix{k}", "video": by_id[v]["video"]} for k, v in enumerate(("v0", "v1", "v2", "v3"))]
    records = [by_id[k] for k in ("v0", "v1", "v2", "v3", "i0", "i1", "i2")] + [two] + texts + mixes
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "zero3_video"

    def flags(out_dir, batch):
        return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
                "--version", "vicuna_v1", "--data_path", str(data), "--image_folder", str(corpus["image_folder"]),
                "--video_folder", str(corpus["video_folder"]), "--image_aspect_ratio", "anyres_max_2",
                "--image_grid_pinpoints", "(1x1),...,(2x2)", "--mm_patch_merge_type", "spatial_unpad",
                "--mm_newline_position", "one_token", "--frames_upbound", "4", "--force_sample", "True",
                "--group_by_modality_length", "True", "--output_dir", str(out_dir), "--max_steps", "4",
                "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-3", "--logging_steps", "1",
                "--save_steps", "2", "--report_to", "none", "--model_max_length", "1024", "--seed", "0"]

    assert_zero3_two_ranks_match_one_process(flags, out, tmp_path / "single", LlavaOnevisionForConditionalGeneration, timeout=900)
