"""Measure the peak memory of streaming conversion against model size (not a test; takes ~1-2 minutes).

Run:  .venv/bin/python scripts/measure_megatron_convert_memory.py [--layers 4 16] [--hidden 1024] [--workdir /tmp/mem]

Builds Llama checkpoints of one width and several depths (fp32, vocab 32000, untied, saved in 500 MB shards),
then runs ``python -m llava.megatron.converter.convert_cli {hf2mcore --tp 2 --pp 2, mcore2hf} --report-memory`` in fresh
processes. ``conversion_rss_mib`` is peak RSS minus the RSS after imports (VmHWM reset after imports, Linux). Streaming means it
stays flat as layers are added: it is set by the largest op group (the padded vocab embedding), not the model.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers


def build(path: Path, layers: int, hidden: int) -> tuple[float, float]:
    """Save the checkpoint; return (model MiB, one decoder layer MiB)."""
    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path, max_shard_size="500MB")
    mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return mib, sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()) / 2**20


def run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "llava.megatron.converter.convert_cli", *args, "--report-memory"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return re.search(r"conversion_rss_mib=([\d.]+) seconds=([\d.]+)", out).group(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="llava_mem_"))
    for layers in args.layers:
        hf, mca, back = root / f"hf_{layers}", root / f"mca_{layers}", root / f"back_{layers}"
        size, layer = build(hf, layers, args.hidden)
        embedding = 32000 * args.hidden * 4 / 2**20
        print(f"layers={layers} model_mib={size:.0f} one_layer_mib={layer:.0f} embedding_mib={embedding:.0f}")
        print(f"  hf2mcore --tp 2 --pp 2: {run('hf2mcore', '--tp', '2', '--pp', '2', str(hf), str(mca))}")
        print(f"  mcore2hf:               {run('mcore2hf', str(mca), str(back))}")


if __name__ == "__main__":
    main()
