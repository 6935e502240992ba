"""Video under two processes (DeepSpeed ZeRO-3 on CPU, gloo): a mix of video, image, multi-image and text records.

    .venv/bin/pytest tests/train/test_video_distributed.py

2 processes x batch 2 give the same per-step losses as 1 process x batch 4 (1e-5) and a resumed run repeats the
uninterrupted losses; the saved checkpoint is a whole LlavaOnevision. ``--group_by_modality_length`` keeps each
optimizer step to one modality (video its own), so under ZeRO-3 every rank runs the same tower path in a step.
``scripts/finetune_video.sh`` runs on the demo's clip corpus, with its defaults and with its LlavaNextVideo settings, and
saves the native class those settings imply, with processor files that count the video tokens the native model fills.
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



@pytest.mark.parametrize("layout", ["onevision", "next_video"])
def test_finetune_video_script_runs_and_saves_the_native_class(tiny_models, shapes_data, tmp_path, layout):
    """scripts/finetune_video.sh (2 processes, ZeRO-3, 4 frames) on the demo's clip corpus, with its defaults (bilinear
    pooling, one newline per video: ``LlavaOnevisionForConditionalGeneration``) and with ``NEWLINE=no_token
    POOL=average ASPECT=anyres`` (``LlavaNextVideoForConditionalGeneration``): the checkpoint loads as that class, and
    its processor files count per video, by the processor's own formula, the tokens the native model's video features
    fill (a forward with one token fewer raises)."""
    import math

    import torch
    from test_distributed import assert_no_zero_size_tensors, script, step_losses
    from transformers import LlavaNextVideoForConditionalGeneration

    frames = 4  # the script's FRAMES
    corpus = write_video_corpus(tmp_path / "dots", n_videos=12, n_images=4, text=False, mix=False)  # the demo's
    env = {} if layout == "onevision" else {"NEWLINE": "no_token", "POOL": "average", "ASPECT": "anyres"}
    script("finetune_video", tmp_path, tiny_models, shapes_data, MAX_STEPS=4, DATA=corpus["train"],
           VIDEO_DIR=corpus["video_folder"], IMAGE_DIR=corpus["image_folder"], **env)
    out = tmp_path / "finetune_video"
    ta = json.loads((out / "llava_args.json").read_text())["training_args"]
    assert ta["deepspeed"].endswith("zero3.json") and ta["group_by_modality_length"]
    losses = step_losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert_no_zero_size_tensors(out)

    config = json.loads((out / "config.json").read_text())
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["video_token"] == "<video>" and config["video_token_index"] != config["image_token_index"]
    size = processor["video_processor"]["size"]
    if layout == "onevision":
        native = LlavaOnevisionForConditionalGeneration
        assert (config["model_type"], config["vision_aspect_ratio"]) == ("llava_onevision", "anyres_max_9")
        assert processor["processor_class"] == "LlavaOnevisionProcessor"
        side = int(math.sqrt(processor["num_image_tokens"]))  # LlavaOnevisionProcessor: 2x pooled frames + a newline
        per_video = frames * math.ceil(side / 2) ** 2 + 1
    else:
        native = LlavaNextVideoForConditionalGeneration
        assert config["model_type"] == "llava_next_video"
        assert (config["spatial_pool_mode"], config["spatial_pool_stride"]) == ("average", 2)
        assert processor["processor_class"] == "LlavaNextVideoProcessor"
        patch = processor["patch_size"]  # LlavaNextVideoProcessor: the frame's patches pooled 2x2, per frame
        per_video = (size["height"] // patch) * (size["width"] // patch) // 4 * frames
    assert config["architectures"] == [native.__name__]
    model = native.from_pretrained(out).eval()
    pixels = torch.rand(1, frames, 3, size["height"], size["width"])
    with torch.no_grad():
        for count in (per_video, per_video - 1):
            ids = torch.tensor([[1] + [config["video_token_index"]] * count + [5, 9]])
            if count == per_video:
                assert torch.isfinite(model(input_ids=ids, pixel_values_videos=pixels).logits).all()
            else:
                with pytest.raises(ValueError, match="do not match"):
                    model(input_ids=ids, pixel_values_videos=pixels)
