"""Video under two processes (DeepSpeed ZeRO-3 on CPU, gloo): a mix of video, image, multi-image and text records.

    .venv/bin/pytest tests/train/test_video_distributed.py

2 processes x batch 2 give the same per-step losses as 1 process x batch 4 (1e-5) and a resumed run repeats the
uninterrupted losses; the saved checkpoint is a whole LlavaOnevision. ``--group_by_modality_length`` keeps each
optimizer step to one modality (video its own), so under ZeRO-3 every rank runs the same tower path in a step.
"""

from __future__ import annotations

import json

import pytest
from test_distributed import PROBE, REPO, assert_no_zero_size_tensors, assert_resumes_exactly, deepspeed, step_losses
from transformers import LlavaOnevisionForConditionalGeneration

from llava.train.train import train
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

    zero3 = ["--deepspeed", str(REPO / "zero_configs" / "zero3.json")]
    deepspeed([PROBE], [*zero3, *flags(out, 2)], timeout=900)
    single = train([*flags(tmp_path / "single", 4), "--use_cpu", "True"])
    reference = {e["step"]: e["loss"] for e in single.state.log_history if "loss" in e}
    losses = step_losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in losses.items():
        assert abs(loss - reference[step]) <= 1e-5, (step, loss, reference[step])
    assert_no_zero_size_tensors(out)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(out)
    assert model.model.image_newline.abs().sum() > 0
    assert_resumes_exactly(out, lambda: deepspeed([PROBE], [*zero3, *flags(out, 2), "--resume_from_checkpoint", "True"],
                                                  timeout=900))
