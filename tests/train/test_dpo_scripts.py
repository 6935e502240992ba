"""LLaVA-NeXT's ``scripts/train/dpo_ov7b.sh`` runs with only its paths changed, and its output loads natively.

    .venv/bin/pytest tests/train/test_dpo_scripts.py          # slow: a OneVision SFT run, then the DPO recipe

The flags are those of LLaVA-VL/LLaVA-NeXT ``scripts/train/dpo_ov7b.sh`` as the script passes them (``--flag=value``
forms included). Only these change: the SFT model (a tiny OneVision stage-2 run of ours, SigLIP tower,
``anyres_max_9``), the vision tower, data, image folder and output paths, and on CPU ``--bf16`` / ``--tf32`` False
(as the LLaVA-1.5 and LLaVA-NeXT script tests do). The run goes through ``python -m llava.train.train_dpo`` as one
DeepSpeed rank (the script's ``--deepspeed scripts/zero3.json`` maps to the bundled ZeRO-3 config; the frozen
reference is built and sharded by ZeRO-3 like the policy), and its output is read back with
``LlavaOnevisionForConditionalGeneration.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_llava15_scripts import _free_port
from transformers import LlavaOnevisionForConditionalGeneration

from llava.train.train import train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DPO_OV7B = shlex.split(  # dpo_ov7b.sh after `llava/train/train_dpo.py`, its shell variables as {PLACEHOLDERS}
    "--deepspeed scripts/zero3.json --model_name_or_path={SFT_MODEL} --dpo_alpha=1.0 --beta={beta} --gamma=0 "
    "--version {PROMPT_VERSION} --data_path={DATA_PATH} --image_folder {IMAGE_FOLDER} "
    "--mm_tunable_parts=\"mm_vision_tower,mm_mlp_adapter,mm_language_model\" --unfreeze_mm_vision_tower True "
    "--vision_tower {VISION_MODEL_VERSION} --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 "
    "--mm_use_im_start_end False --mm_use_im_patch_token False --group_by_modality_length True "
    "--image_aspect_ratio anyres_max_9 --image_grid_pinpoints \"(1x1),...,(6x6)\" --mm_patch_merge_type spatial_unpad "
    "--bf16 True --run_name {DPO_CLEAN_NAME} --output_dir {OUTPUT_DIR} --num_train_epochs {EPOCH} "
    "--per_device_train_batch_size 1 --per_device_eval_batch_size 1 --gradient_accumulation_steps 8 "
    "--evaluation_strategy \"no\" --save_strategy \"steps\" --save_steps 1000 --save_total_limit 1 "
    "--learning_rate 5e-7 --weight_decay 0. --warmup_ratio 0.1 --lr_scheduler_type \"cosine\" --logging_steps 1 "
    "--tf32 True --model_max_length 32768 --gradient_checkpointing True --dataloader_num_workers 4 "
    "--lazy_preprocess True --report_to wandb --dataloader_drop_last True")
CPU_SUBSTITUTIONS = {"--bf16": "False", "--tf32": "False"}


@pytest.fixture(scope="module")
def onevision_sft(tiny_models, anyres_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ov_sft")
    train(["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["siglip_tower"]),
           "--version", "qwen_1_5", "--data_path", str(anyres_data["train"]),
           "--image_folder", str(anyres_data["image_folder"]), "--image_aspect_ratio", "anyres_max_9",
           "--image_grid_pinpoints", "(1x1),...,(6x6)", "--mm_patch_merge_type", "spatial_unpad",
           "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "2",
           "--learning_rate", "1e-3", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True",
           "--seed", "0", "--model_max_length", "4096"])
    return out


def test_dpo_ov7b_flags_run_and_output_loads_natively(onevision_sft, tiny_models, dpo_pairs, anyres_data, tmp_path):
    out = tmp_path / "llava-onevision-qwen2-7b-ov_dpo-beta0.1-epoch1"
    paths = {"SFT_MODEL": str(onevision_sft), "beta": "0.1", "PROMPT_VERSION": "qwen_1_5", "DATA_PATH": str(dpo_pairs),
             "IMAGE_FOLDER": str(anyres_data["image_folder"]), "VISION_MODEL_VERSION": str(tiny_models["siglip_tower"]),
             "DPO_CLEAN_NAME": out.name, "OUTPUT_DIR": str(out), "EPOCH": "1"}
    argv = [a.format(**paths) for a in DPO_OV7B]
    for i, arg in enumerate(argv[:-1]):
        if arg in CPU_SUBSTITUTIONS:
            argv[i + 1] = CPU_SUBSTITUTIONS[arg]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "llava.train.train_dpo", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]

    run = json.loads((out / "llava_args.json").read_text())
    assert run["run_kind"] == "full"
    ta = run["training_args"]
    assert (ta["training_stage"], ta["beta"], ta["dpo_alpha"], ta["gamma"], ta["loss_type"]) == ("dpo", 0.1, 1.0, 0.0,
                                                                                                 "sigmoid")
    assert ta["gradient_accumulation_steps"] == 8 and ta["deepspeed"].endswith("zero_configs/zero3.json")
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == 1 and len(logged) == 1  # 8 pairs, batch 1 x 8 accumulation, one epoch
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(logged[0])

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(out)
    assert model.config.vision_aspect_ratio == "anyres_max_9"
    # the first step's policy is the reference: DPO's loss is log 2 (--gamma 0), every reward 0
    assert logged[0]["loss"] == pytest.approx(0.6931472, abs=1e-5) and logged[0]["rewards/margins"] == 0
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 9]])
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert load_file(next(out.glob("model*.safetensors")))  # a native safetensors checkpoint
