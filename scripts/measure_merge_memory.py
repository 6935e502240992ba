"""Measure the peak memory of ``llava merge`` against model size (not a test; takes ~1 minute).

Run:  .venv/bin/python scripts/measure_merge_memory.py [--layers 2 8] [--hidden 512] [--workdir /tmp/mm]

Builds Llama LLMs of one width and several depths (fp32, untied) plus a tiny CLIP, writes a LoRA run directory
for each (adapter with random non-zero ``lora_B``, non-LoRA trainables, ``llava_args.json``: what a
``--lora_enable`` run writes), then merges each in a fresh process. ``merge_rss_mib`` is peak RSS minus the RSS
after imports (Linux ``VmHWM``, reset after importing the libraries the merge uses), for the streaming merge (the default) and the in-memory one:
the LLM is saved in 20 MB shards and merged into 20 MB shards, so streaming should stay flat as layers grow, while
the in-memory merge holds one copy of the model (ratio ~1), not two (~2).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, torch
import accelerate, peft, transformers.integrations.bitsandbytes, transformers.training_args  # library imports: not
from llava.export.merge import merge_lora                                                   # the merge's memory
def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")
base = hwm()
merge_lora(sys.argv[1], sys.argv[2], max_shard_size="20MB", streaming=sys.argv[3] == "streaming")
print(f"MERGE_RSS_MIB {hwm() - base:.1f}")
"""


def write_run(workdir: Path, layers: int, hidden: int) -> tuple[Path, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llava.demo.tiny_models import train_tiny_tokenizer, write_tiny_vision_tower
    from llava.model.builder import apply_freezing, build_llava_model
    from llava.run_dir import write_run_args
    from llava.train.args import ModelArguments
    from llava.train.lora import save_lora_checkpoint, setup_lora

    llm_dir, run_dir = workdir / f"llm-{layers}", workdir / f"run-{layers}"
    tower = workdir / "clip"
    if not tower.exists():
        write_tiny_vision_tower(tower, kind="clip")
    tokenizer = train_tiny_tokenizer(["a red square", "a blue circle"] * 50, vocab_size=512)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(llm_dir, max_shard_size="20MB")  # sharded like real LLMs
    tokenizer.save_pretrained(llm_dir)
    margs = ModelArguments(model_name_or_path=str(llm_dir), vision_tower=str(tower))
    built = build_llava_model(margs)
    apply_freezing(built.model, margs, added_tokens=built.added_tokens)
    targs = argparse.Namespace(lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_bias="none", bits=16)
    model = setup_lora(built.model, margs, targs, added_tokens=built.added_tokens)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    save_lora_checkpoint(model, run_dir)
    built.processor.save_pretrained(run_dir)
    write_run_args(run_dir, {"model_args": vars(margs), "data_args": {}, "training_args": {**vars(targs)}})
    size = sum(p.numel() * p.element_size() for p in model.get_base_model().parameters()) / 2**20
    return run_dir, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--workdir", default="/tmp/llava-merge-memory")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    for layers in args.layers:
        run_dir, size = write_run(workdir, layers, args.hidden)
        for mode in ("streaming", "in_memory"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(workdir / f"merged-{layers}-{mode}"),
                                  mode], capture_output=True, text=True, check=True).stdout
            rss = float(out.split("MERGE_RSS_MIB")[-1])
            print(f"layers={layers} hidden={args.hidden} mode={mode} model_mib={size:.1f} merge_rss_mib={rss:.1f} "
                  f"ratio={rss / size:.2f}", flush=True)


if __name__ == "__main__":
    main()
