"""Video training end to end: video, image, image+video and text records in one run, saved as native
LlavaOnevision (bilinear pooling, one newline per video) or LlavaNextVideo (average pooling, no newline).

    .venv/bin/python -m pytest tests/train/test_video_train.py -q

The saved checkpoint loads with ``LlavaOnevisionForConditionalGeneration`` / ``LlavaNextVideoForConditionalGeneration``
``.from_pretrained`` (no code of ours) and its logits on a batch holding a video equal the trained model's (fp32,
1e-5); a LoRA run merges with the same parity. The processors' video halves need torchvision (absent here): their
saved settings are checked to count, by the processors' own formulas, the video tokens training used.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlavaNextVideoForConditionalGeneration, LlavaOnevisionForConditionalGeneration

from llava.errors import UsageValueError
from llava.train.args import parse_args
from llava.train.train import train
from tests.data.video_clips import write_video_corpus

FRAMES = 4


@pytest.fixture(scope="module")
def video_corpus(tmp_path_factory):
    return write_video_corpus(tmp_path_factory.mktemp("video_corpus"))


def video_argv(tiny_models, corpus, out, *, newline: str = "one_token", extra=()) -> list[str]:
    onevision = newline == "one_token"
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--data_path", str(corpus["train"]), "--image_folder", str(corpus["image_folder"]),
            "--video_folder", str(corpus["video_folder"]), "--version", "vicuna_v1",
            "--image_aspect_ratio", "anyres_max_2" if onevision else "anyres", "--mm_patch_merge_type", "spatial_unpad",
            "--image_grid_pinpoints", "(1x1),...,(2x2)", "--mm_newline_position", newline,
            "--mm_spatial_pool_mode", "bilinear" if onevision else "average", "--mm_spatial_pool_stride", "2",
            "--frames_upbound", str(FRAMES), "--force_sample", "True", "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--max_steps", "3", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_steps", "100", "--report_to", "none", "--model_max_length", "1024", "--use_cpu", "True",
            "--seed", "0", *extra]


def _mixed_batch(trainer):
    """A batch with a video record, a frame-directory video, an image, the image+video record and the text record."""
    ds = trainer.train_dataset
    ids = {ds.record(i).id: i for i in range(len(ds))}
    picked = [ids[k] for k in ("v0", "v1", "i1", "mix", "text")]
    return trainer.data_collator([ds[i] for i in picked]), [ds.record(i) for i in picked]


def _check_native_parity(trainer, out, native_cls, model_type):
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [native_cls.__name__] and config["model_type"] == model_type
    tokenizer = trainer.processing_class.tokenizer
    assert config["video_token_index"] == tokenizer.convert_tokens_to_ids("<video>") != config["image_token_index"]
    batch, records = _mixed_batch(trainer)
    assert batch["pixel_values_videos"].shape[-3:] == (3, 64, 64)
    model = native_cls.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(**batch).logits
        expected = trainer.model.eval()(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    return config, batch, records


def test_onevision_video_run_saves_native_onevision_with_logit_parity(tiny_models, video_corpus, tmp_path):
    trainer = train(video_argv(tiny_models, video_corpus, tmp_path))
    config, batch, records = _check_native_parity(trainer, tmp_path, LlavaOnevisionForConditionalGeneration,
                                                  "llava_onevision")
    assert batch["pixel_values_videos"].shape[:2] == (3, FRAMES)  # v0, v1 (frames directory), mix
    processor = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaOnevisionProcessor" and processor["video_token"] == "<video>"
    assert processor["video_processor"]["size"] == {"height": 64, "width": 64}
    # LlavaOnevisionProcessor.replace_video_token with the saved num_image_tokens: tokens of each video
    side = int(math.sqrt(processor["num_image_tokens"]))
    per_video = FRAMES * math.ceil(side / 2) ** 2 + 1
    video_id = config["video_token_index"]
    counts = [(row == video_id).sum().item() for row in batch["input_ids"]]
    assert counts == [per_video if r.video else 0 for r in records]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_next_video_run_saves_native_llava_next_video_with_logit_parity(tiny_models, video_corpus, tmp_path):
    trainer = train(video_argv(tiny_models, video_corpus, tmp_path, newline="no_token"))
    config, batch, records = _check_native_parity(trainer, tmp_path, LlavaNextVideoForConditionalGeneration,
                                                  "llava_next_video")
    assert (config["spatial_pool_mode"], config["spatial_pool_stride"]) == ("average", 2)
    assert batch["pixel_values_videos"].shape[:2] == (1, 3 * FRAMES)  # no newline: the videos' frames as one
    processor = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaNextVideoProcessor" and processor["video_token"] == "<video>"
    size = processor["video_processor"]["size"]
    assert size == {"height": 64, "width": 64} and not processor["video_processor"]["do_center_crop"]
    # LlavaNextVideoProcessor.replace_video_token with the saved patch size and the video processor's frame size
    per_video = (size["height"] // processor["patch_size"]) * (size["width"] // processor["patch_size"]) // 4 * FRAMES
    counts = [(row == config["video_token_index"]).sum().item() for row in batch["input_ids"]]
    assert counts == [per_video if r.video else 0 for r in records]


def test_onevision_video_lora_run_merges_with_logit_parity(tiny_models, video_corpus, tmp_path):
    from llava.export.merge import merge_lora

    run_dir = tmp_path / "lora"
    trainer = train(video_argv(tiny_models, video_corpus, run_dir, extra=[
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "2e-3"]))
    batch, _ = _mixed_batch(trainer)
    with torch.no_grad():
        expected = trainer.model.eval()(**batch).logits  # the adapter model as it trained
    merged_dir = merge_lora(run_dir, tmp_path / "merged")
    assert json.loads((merged_dir / "config.json").read_text())["architectures"] == [
        "LlavaOnevisionForConditionalGeneration"]
    merged = LlavaOnevisionForConditionalGeneration.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("extra", "message"), [
    (["--mm_newline_position", "grid"], r"--mm_newline_position grid: .* no native class.* use one_token"),
    (["--mm_newline_position", "frame"], r"--mm_newline_position frame: .* use one_token"),
    (["--mm_spatial_pool_mode", "average"], r"--mm_spatial_pool_mode average with --mm_newline_position one_token: .*"
                                            r"use bilinear"),
    (["--mm_spatial_pool_stride", "4"], r"--mm_spatial_pool_stride 4: .* use 2"),
    (["--image_aspect_ratio", "anyres"], r"--image_aspect_ratio anyres with --mm_newline_position one_token: .*"
                                         r"anyres_max_9"),
    (["--force_sample", "False"], r"--per_device_train_batch_size 4 with --mm_newline_position one_token needs "
                                  r"--force_sample True"),
])
def test_settings_no_native_class_computes_are_refused_at_start(tiny_models, video_corpus, tmp_path, extra, message):
    with pytest.raises(UsageValueError, match=message) as info:
        parse_args(video_argv(tiny_models, video_corpus, tmp_path, extra=extra))
    assert "\n" not in str(info.value)
