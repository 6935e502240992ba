"""Per-rank memory of the Megatron backend at TP1 vs TP2 (not a test; ~2 minutes on 2 CPU cores).

Run:  PYTHONPATH=. .venv/bin/python scripts/megatron_memory.py [--workdir /tmp/mg_mem] [--hidden 768] [--layers 4]

Builds the demo's shapes data and tiny CLIP tower plus a wider Llama-style LM (demo tokenizer), then trains stage 2
for 2 steps with ``llava train --backend megatron`` at TP1 (1 process) and TP2 (2 processes, gloo), and prints what
each rank holds, from ``megatron_state.json`` (``llava/megatron/backend/rank_memory.py``: bytes of the actual tensors -- LM
weights, gradient buffers, Adam state -- and the peak RSS, which includes ~0.5 GB of imported libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from llava.demo.shapes import generate_shapes_dataset
from llava.demo.tiny_models import write_demo_models


def build(root: Path, hidden: int, layers: int) -> tuple[dict, Path]:
    data = generate_shapes_dataset(root / "shapes", n_caption=8, n_qa=32, n_heldout=4, seed=0)
    models = write_demo_models(root, data)
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["llm"])
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=1024, tie_word_embeddings=False,
                                      pad_token_id=tokenizer.pad_token_id)
    llm = root / "models" / "wide-llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    return {"data": data, "tower": models["vision_tower"]}, llm


def run(root: Path, parts: dict, llm: Path, tp: int) -> list[dict]:
    out = root / f"tp{tp}"
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--model_name_or_path", str(llm), "--vision_tower", str(parts["tower"]), "--version", "vicuna_v1",
             "--data_path", str(parts["data"]["stage2_qa"]), "--image_folder", str(parts["data"]["image_folder"]),
             "--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
             "--model_max_length", "256", "--output_dir", str(out), "--save_hf", "False", "--backend", "megatron",
             "--tensor_model_parallel_size", str(tp)]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([str(torchrun), "--nproc_per_node", str(tp), "--master_port", str(29600 + tp), "-m",
                    "llava.train.train", *flags], check=True, env=env, capture_output=True)
    return json.loads((out / "megatron_state.json").read_text())["memory"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/llava_megatron_memory")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    root = Path(args.workdir)
    parts, llm = build(root, args.hidden, args.layers)
    results = {tp: run(root, parts, llm, tp) for tp in (1, 2)}
    keys = ["lm_weights_mib", "grad_buffers_mib", "optimizer_state_mib", "vision_weights_mib", "peak_rss_mib"]
    print(f"{'':8}" + "".join(f"{k:>22}" for k in keys))
    for tp, ranks in results.items():
        for r in ranks:
            print(f"TP{tp} r{r['rank']}" + "".join(f"{r[k]:>22.1f}" for k in keys))
    one, two = results[1][0], results[2][0]
    lm_state = ("lm_weights_mib", "grad_buffers_mib", "optimizer_state_mib")
    ratio = sum(two[k] for k in lm_state) / sum(one[k] for k in lm_state)
    print(f"TP2/TP1 per rank, weights + grads + optimizer state: {ratio:.3f}")


if __name__ == "__main__":
    main()
