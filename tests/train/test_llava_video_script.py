"""LLaVA-Video's training script, ``SO400M_Qwen2_7B_ov_to_video_am9.sh`` (LLaVA-VL/LLaVA-NeXT,
its video/train scripts),
with only paths changed: refused in one line for its ``--mm_newline_position grid``; with ``one_token`` (the
one-line change to the native OneVision layout) it parses to what it asks for, and it runs.

    .venv/bin/python -m pytest tests/train/test_llava_video_script.py      # the run is marked slow

As ``tests/train/test_llava_next_scripts.py`` does: the flags are written as the script passes them; model, data and
output paths change (its OneVision starting checkpoint is a tiny one trained here, its SigLIP tower a tiny one at
384 px; its data YAML becomes a JSON file); on CPU ``--bf16`` / ``--tf32`` False, and the run leaves out
``--torch_compile True --torch_compile_backend inductor`` (minutes of compiling here).
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest

from llava.errors import UsageValueError
from llava.train.args import parse_args
from tests.data.video_clips import write_video_corpus
from tests.train.test_llava15_scripts import run_in_one_process

AM9 = shlex.split(
    "--deepspeed scripts/zero3.json --model_name_or_path {CKPT} --version qwen_1_5 --data_path {DATA} "
    "--image_folder {IMAGES} --video_folder {VIDEOS} "
    '--mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model" --mm_vision_tower_lr=2e-6 '
    "--vision_tower {SIGLIP} --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 "
    "--mm_use_im_start_end False --mm_use_im_patch_token False --group_by_modality_length True "
    '--image_aspect_ratio anyres_max_9 --image_grid_pinpoints  "(1x1),...,(6x6)" --mm_patch_merge_type spatial_unpad '
    "--bf16 True --run_name am9 --output_dir {OUT} --num_train_epochs 1 --per_device_train_batch_size 1 "
    '--per_device_eval_batch_size 4 --gradient_accumulation_steps 2 --evaluation_strategy "no" '
    '--save_strategy "steps" --save_steps 500 --save_total_limit 1 --learning_rate 1e-5 --weight_decay 0. '
    '--warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 1 --tf32 True --model_max_length 32768 '
    "--gradient_checkpointing True --dataloader_num_workers 2 --lazy_preprocess True --report_to wandb "
    '--torch_compile True --torch_compile_backend "inductor" --dataloader_drop_last True --frames_upbound 64 '
    "--mm_newline_position grid --add_time_instruction True --force_sample True --mm_spatial_pool_stride 2")
CPU = {"--bf16": "False", "--tf32": "False"}
NOT_RUN_ON_CPU = ("--torch_compile", "--torch_compile_backend")


def am9_argv(paths: dict, *, run_steps: int | None = None, native: bool = True) -> list[str]:
    argv = [a.format(**paths) for a in AM9]
    for i, arg in enumerate(argv[:-1]):
        if arg in CPU:
            argv[i + 1] = CPU[arg]
    if native:
        argv += ["--mm_newline_position", "one_token"]
    if run_steps:
        drop = {i + k for i, arg in enumerate(argv) if arg in NOT_RUN_ON_CPU for k in (0, 1)}
        argv = [a for i, a in enumerate(argv) if i not in drop] + ["--max_steps", str(run_steps)]
    return argv


@pytest.fixture(scope="module")
def am9_paths(tmp_path_factory) -> dict:
    from llava.demo.tiny_models import write_tiny_vision_tower

    root = tmp_path_factory.mktemp("am9")
    corpus = write_video_corpus(root / "data")
    return {"DATA": str(corpus["train"]), "IMAGES": str(corpus["image_folder"]), "VIDEOS": str(corpus["video_folder"]),
            "SIGLIP": str(write_tiny_vision_tower(root / "siglip384", kind="siglip", image_size=384, patch_size=48,
                                                  hidden_size=32)),
            "CKPT": str(root / "ov_si"), "OUT": str(root / "am9_out"), "corpus": corpus}


def test_am9_grid_is_refused_in_one_line_naming_the_native_setting(am9_paths):
    with pytest.raises(UsageValueError) as info:
        parse_args(am9_argv(am9_paths, native=False))
    message = str(info.value)
    assert "\n" not in message and message.startswith("--mm_newline_position grid:")
    assert "no native class" in message and "use one_token" in message


def test_am9_with_one_token_parses_to_what_it_asks_for(am9_paths):
    model_args, data_args, training_args = parse_args(am9_argv(am9_paths))
    assert (model_args.mm_newline_position, model_args.mm_spatial_pool_mode, model_args.mm_spatial_pool_stride) == (
        "one_token", "bilinear", 2)  # bilinear: LLaVA-NeXT's default --mm_spatial_pool_mode
    assert (data_args.frames_upbound, data_args.force_sample, data_args.add_time_instruction) == (64, True, True)
    assert data_args.video_folder == am9_paths["VIDEOS"] and data_args.video_fps == 1
    assert model_args.unfreeze_mm_vision_tower and not model_args.freeze_backbone
    assert training_args.mm_vision_tower_lr == 2e-6 and training_args.group_by_modality_length
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (1, 2)
    assert training_args.torch_compile and training_args.dataloader_num_workers == 2


@pytest.mark.slow
def test_am9_runs_from_a_onevision_checkpoint_and_saves_native_onevision(tiny_models, am9_paths):
    from transformers import LlavaOnevisionForConditionalGeneration

    from llava.train.train import train

    corpus = am9_paths["corpus"]
    images = Path(am9_paths["DATA"]).with_name("images_only.json")
    images.write_text(json.dumps([r for r in corpus["records"] if "image" in r and "video" not in r]))
    train(["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", am9_paths["SIGLIP"], "--version",
           "qwen_1_5", "--data_path", str(images), "--image_folder", am9_paths["IMAGES"],
           "--image_aspect_ratio", "anyres_max_9", "--image_grid_pinpoints", "(1x1),...,(6x6)",
           "--mm_patch_merge_type", "spatial_unpad", "--output_dir", am9_paths["CKPT"], "--max_steps", "1",
           "--report_to", "none", "--use_cpu", "True"])  # the script's PREV_STAGE_CHECKPOINT: an image OneVision
    out = Path(am9_paths["OUT"])
    out.mkdir(parents=True, exist_ok=True)
    run_in_one_process([am9_argv(am9_paths, run_steps=2)], out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    assert "<video>" in json.dumps(tokenizer)
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(out)
    assert model.config.video_token_id != model.config.image_token_id
