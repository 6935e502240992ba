"""The LLaVA-1.5 launcher scripts' flag sets run unchanged on tiny models, and their outputs load natively.

    pytest -m slow tests/train/test_llava15_scripts.py

The flags of upstream LLaVA's ``scripts/v1_5/{pretrain,finetune,finetune_lora,finetune_task,finetune_task_lora}.sh``
are listed below as the scripts pass them, including ``--deepspeed ./scripts/zero2.json`` (absent here: the bundled
``zero_configs/`` file is used) and ``--evaluation_strategy "no"`` (renamed by transformers 5: mapped with a
notice). Only these change: model/data/output paths (tiny models, the shapes data), ``--bf16``/``--tf32`` (False on
CPU) and ``--max_steps 1`` added. The five runs go in one DeepSpeed process (RANK/WORLD_SIZE set, gloo), in order:
stage 1, stage 2 from its projector, LoRA, and the two task runs from the stage-2 checkpoint. Each output loads as a
plain ``LlavaForConditionalGeneration`` (LoRA runs after ``llava merge``), and the chat template saved with the
stage-2 checkpoint renders the ids its training used.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava.data.records import Message
from llava.data.templates import get_template
from llava.data.tokenize import tokenize_conversation

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# Shared by all five scripts, as they pass them.
COMMON = ("--mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --mm_use_im_start_end False "
          "--mm_use_im_patch_token False --bf16 True --num_train_epochs 1 --per_device_train_batch_size 16 "
          "--per_device_eval_batch_size 4 --evaluation_strategy no --save_strategy steps --save_total_limit 1 "
          "--weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 --tf32 True "
          "--model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True "
          "--report_to wandb").split()
LORA = "--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5".split()
TASK_STAGE2 = "--image_aspect_ratio pad --group_by_modality_length True".split()
SCRIPTS = {  # name -> flags beyond COMMON ({LLM} etc. are the paths the scripts take as arguments)
    "pretrain": ["--deepspeed", "./scripts/zero2.json", "--model_name_or_path", "{LLM}", "--version", "plain",
                 "--data_path", "{CAPTIONS}", "--image_folder", "{IMAGES}", "--vision_tower", "{TOWER}",
                 "--tune_mm_mlp_adapter", "True", "--output_dir", "{OUT}/pretrain", "--gradient_accumulation_steps",
                 "4", "--save_steps", "24000", "--learning_rate", "1e-3"],
    "finetune": ["--deepspeed", "./scripts/zero3.json", "--model_name_or_path", "{LLM}", "--version", "v1",
                 "--data_path", "{QA}", "--image_folder", "{IMAGES}", "--vision_tower", "{TOWER}",
                 "--pretrain_mm_mlp_adapter", "{OUT}/pretrain/mm_projector.safetensors", *TASK_STAGE2,
                 "--output_dir", "{OUT}/finetune", "--gradient_accumulation_steps", "1", "--save_steps", "50000",
                 "--learning_rate", "2e-5"],
    "finetune_lora": [*LORA, "--deepspeed", "./scripts/zero3.json", "--model_name_or_path", "{LLM}", "--version", "v1",
                      "--data_path", "{QA}", "--image_folder", "{IMAGES}", "--vision_tower", "{TOWER}",
                      "--pretrain_mm_mlp_adapter", "{OUT}/pretrain/mm_projector.safetensors", *TASK_STAGE2,
                      "--output_dir", "{OUT}/finetune_lora", "--gradient_accumulation_steps", "2", "--save_steps",
                      "50000", "--learning_rate", "2e-4"],
    "finetune_task": ["--deepspeed", "./scripts/zero3.json", "--model_name_or_path", "{OUT}/finetune", "--version", "v1",
                      "--data_path", "{QA}", "--image_folder", "{IMAGES}", "--vision_tower", "{TOWER}", *TASK_STAGE2,
                      "--output_dir", "{OUT}/finetune_task", "--gradient_accumulation_steps", "1", "--save_steps",
                      "50000", "--learning_rate", "2e-5"],
    "finetune_task_lora": [*LORA, "--deepspeed", "./scripts/zero3.json", "--model_name_or_path", "{OUT}/finetune",
                           "--version", "v1", "--data_path", "{QA}", "--image_folder", "{IMAGES}", "--vision_tower",
                           "{TOWER}", *TASK_STAGE2, "--output_dir", "{OUT}/finetune_task_lora",
                           "--gradient_accumulation_steps", "1", "--save_steps", "50000", "--learning_rate", "2e-4"],
}
CPU_SUBSTITUTIONS = {"--bf16": "False", "--tf32": "False"}

DRIVER = """
import json, sys
from llava.train.train import train
for argv in json.loads(sys.argv[1]):
    train(argv)
"""


def run_in_one_process(argvs: list[list[str]], out: Path) -> str:
    """Train each argv in turn in one single-rank DeepSpeed process (``DRIVER``); its log, which must end well."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WANDB_MODE": "offline", "WANDB_DIR": str(out), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=out, env=env, capture_output=True,
                          text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    return log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_argv(name: str, paths: dict[str, str]) -> list[str]:
    argv = [a.format(**paths) for a in SCRIPTS[name]] + COMMON
    for i, arg in enumerate(argv[:-1]):
        if arg in CPU_SUBSTITUTIONS:
            argv[i + 1] = CPU_SUBSTITUTIONS[arg]
    return argv + ["--max_steps", "1"]


@pytest.fixture(scope="module")
def script_runs(tiny_models, shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava15_scripts")
    subsets = {}
    for key in ("stage1_captions", "stage2_qa"):  # one batch of 16 records: the one step sees every record once
        subsets[key] = out / f"{key}_16.json"
        subsets[key].write_text(json.dumps(json.loads(Path(shapes_data[key]).read_text())[:16]))
    paths = {"LLM": str(tiny_models["llm"]), "TOWER": str(tiny_models["vision_tower"]),
             "CAPTIONS": str(subsets["stage1_captions"]), "QA": str(subsets["stage2_qa"]),
             "IMAGES": str(shapes_data["image_folder"]), "OUT": str(out)}
    argvs = [script_argv(name, paths) for name in SCRIPTS]
    log = run_in_one_process(argvs, out)
    return {"dir": out, "log": log, "paths": paths}


def test_renamed_and_missing_flags_are_mapped_with_a_notice(script_runs):
    log = script_runs["log"]
    assert log.count("--evaluation_strategy is --eval_strategy in transformers >= 5") == len(SCRIPTS)
    assert log.count("--deepspeed ./scripts/zero3.json does not exist: using the bundled") == len(SCRIPTS) - 1
    assert "--deepspeed ./scripts/zero2.json does not exist: using the bundled" in log
    for name in SCRIPTS:
        args = json.loads((script_runs["dir"] / name / "llava_args.json").read_text())
        assert args["training_args"]["eval_strategy"] == "no"
        assert args["training_args"]["deepspeed"].endswith(
            "zero_configs/zero2.json" if name == "pretrain" else "zero_configs/zero3.json")


def test_stage1_writes_the_projector(script_runs):
    from safetensors.torch import load_file

    state = load_file(script_runs["dir"] / "pretrain" / "mm_projector.safetensors")
    assert {k.split(".")[-2] for k in state} == {"linear_1", "linear_2"}


@pytest.mark.parametrize("name", ["finetune", "finetune_task", "finetune_lora", "finetune_task_lora"])
def test_outputs_load_natively(script_runs, tmp_path, name):
    out = script_runs["dir"] / name
    if "lora" in name:
        from llava.export.merge import merge_lora

        merge_lora(out, tmp_path / "merged")
        out = tmp_path / "merged"
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    ids = processor.tokenizer("<image>", add_special_tokens=False)["input_ids"]
    assert ids == [model.config.image_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6]])).logits
    assert torch.isfinite(logits).all()


def test_saved_chat_template_renders_the_training_ids(script_runs):
    out = script_runs["dir"] / "finetune"
    processor = AutoProcessor.from_pretrained(out)
    model_config = LlavaForConditionalGeneration.config_class.from_pretrained(out)
    record = json.loads(Path(script_runs["paths"]["QA"]).read_text())[0]
    roles = {"human": "user", "gpt": "assistant"}
    messages = [Message(roles[t["from"]], t["value"]) for t in record["conversations"]]
    train_ids = tokenize_conversation(messages, get_template("v1"), processor.tokenizer,
                                      image_token_id=model_config.image_token_id,
                                      num_image_tokens=model_config.image_seq_length, model_max_length=2048).input_ids
    from PIL import Image

    image = Image.new("RGB", (64, 64), (10, 200, 10))
    chat = []
    for m in messages:
        if "<image>" in m.content:
            text = m.content.replace("<image>", "").strip()
            chat.append({"role": m.role, "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]})
        else:
            chat.append({"role": m.role, "content": m.content})
    rendered = processor.apply_chat_template(chat, tokenize=True, return_dict=True)
    assert rendered["input_ids"][0] == train_ids
    assert processor.tokenizer.convert_ids_to_tokens(train_ids[:2])[0] == processor.tokenizer.bos_token
