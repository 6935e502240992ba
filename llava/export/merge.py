"""Merge a LoRA / QLoRA run into a native ``LlavaForConditionalGeneration`` checkpoint + processor (safetensors).

    llava merge --adapter out/lora --out out/merged [--dtype float32|bfloat16|float16] [--max_shard_size 2GB]
                [--model_base LLM_DIR]      # only to override the base recorded in llava_args.json

Everything comes from the run directory: ``llava_args.json`` names the base LLM, the vision tower and the
quantization (``--bits``); ``non_lora_trainables.safetensors`` holds the projector and new embeddings; the
adapter is peft's. The base is rebuilt with ``build_llava_model`` exactly as training built it, the non-LoRA
trainables are copied in, the adapter is applied and ``merge_and_unload()`` folds ``B @ A * alpha / r`` into each
weight in place. A QLoRA run is rebuilt quantized as in training (the same deterministic quantization of the
same weights), dequantized layer by layer into plain ``nn.Linear``, then merged: the result reproduces the
adapter model the run trained, not the unquantized base plus the adapter.

Streaming (the default for LoRA runs on an LLM directory, ``merge_stream.py``): the language model is merged one
safetensors shard at a time, each tensor written to its offset in the output, so peak memory is the vision tower +
adapter + the tensor being merged, flat in LLM size.
In memory (QLoRA runs, Llava-checkpoint bases, adapters with biases/DoRA): one copy of the model in the output dtype (``P * bytes(dtype)``) plus one layer's LoRA delta
(``out * in`` elements) during the merge; ``save_pretrained`` writes ``--max_shard_size`` shards from the live
tensors. A QLoRA merge also holds the quantized language model while it dequantizes (~``P_lm * 0.5`` bytes at
4 bit, ``P_lm`` at 8 bit, minus each layer as it is replaced), and merges in float32 before casting.
Measured (``scripts/measure_merge_memory.py``, fp32, hidden 512, LLM in 20 MB shards, 20 MB output shards):
2/8/16 layers = 29/106/209 MiB of weights; peak RSS above the libraries' imports, streaming 41/50/50 MiB, in memory
99/171/274 MiB (~1.0x the model per added MiB + ~70 MiB).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import SimpleNamespace

import torch

from llava.errors import UsagePathError, require_model_path, require_path
from llava.export.merge_stream import can_stream, write_merged_streaming
from llava.model.anyres_model import image_layout_args_from_run, load_processor
from llava.model.builder import build_llava_model
from llava.model.quantization import quantization_config
from llava.run_dir import (
    ADAPTER_CONFIG_FILE,
    ARGS_FILE,
    NON_LORA_FILE,
    RunKind,
    load_non_lora_trainables,
    model_args_from_run,
    read_lora_run,
    write_run_args,
)

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_HINT = "give the --output_dir of a `llava train --lora_enable True` run (or one of its checkpoint-N directories)"


def build_adapter_model(adapter_dir: str | Path, *, dtype: torch.dtype = torch.float32, model_base: str | None = None):
    """The run's model as it trained: rebuilt base (dequantized for QLoRA) + non-LoRA trainables + adapter.

    Returns ``(peft_model, processor, run_args)``."""
    # peft only for the in-memory merge (the streaming default reads adapters as files)
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    run = read_lora_run(adapter_dir)
    overrides = {"model_name_or_path": model_base} if model_base else {}
    # the trained projector is in non_lora_trainables, not in the stage-1 file the run started from
    model_args = model_args_from_run(run, pretrain_mm_mlp_adapter=None, **overrides)
    targs = run["training_args"]
    qconfig = None
    if targs.get("bits", 16) != 16:
        qconfig = quantization_config(SimpleNamespace(**targs), torch.float32)
    built = build_llava_model(model_args, torch_dtype=torch.float32 if qconfig else dtype, quantization_config=qconfig,
                              data_args=image_layout_args_from_run(run))
    model = built.model
    if qconfig is not None:
        # bitsandbytes' side of transformers only for QLoRA runs (the [qlora] extra)
        from transformers.integrations.bitsandbytes import dequantize_and_replace

        model = dequantize_and_replace(model, qconfig, dtype=torch.float32)
        model.is_loaded_in_4bit = model.is_loaded_in_8bit = False
        for config in (model.config, model.config.text_config):  # else from_pretrained would re-quantize
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
    non_lora = adapter_dir / NON_LORA_FILE
    if non_lora.is_file():
        loaded = load_non_lora_trainables(model, non_lora)
        logger.info("loaded non-LoRA trainables: %s", loaded)
    processor = load_processor(adapter_dir)
    if len(processor.tokenizer) != model.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"{adapter_dir}: tokenizer has {len(processor.tokenizer)} tokens, the rebuilt model "
                         f"{model.get_input_embeddings().weight.shape[0]} embeddings")
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    return peft_model.eval(), processor, run


def merge_lora(adapter_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
               max_shard_size: str = "2GB", model_base: str | None = None, streaming: bool = True) -> Path:
    """Write the merged native checkpoint + processor + ``llava_args.json`` to ``out_dir``.

    Streams shard by shard (``merge_stream.py``) where it applies, else merges the whole model in memory."""

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    run = read_lora_run(adapter_dir)
    why_not = can_stream(adapter_dir, run, model_base) if streaming else "streaming=False"
    if why_not is None:
        write_merged_streaming(adapter_dir, out_dir, run, dtype=dtype, max_shard_size=max_shard_size,
                               model_base=model_base)
        load_processor(adapter_dir).save_pretrained(out_dir)
    else:
        logger.info("merging in memory (%s)", why_not)
        peft_model, processor, run = build_adapter_model(adapter_dir, dtype=dtype, model_base=model_base)
        merged = peft_model.merge_and_unload().to(dtype)
        merged.config.use_cache = True
        merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
        processor.save_pretrained(out_dir)
    write_run_args(out_dir, run, {"merged_from": str(adapter_dir), "merge_dtype": str(dtype).split(".")[-1],
                                  "projector_only": False, "run_kind": RunKind.MERGED.value})
    logger.info("merged %s into %s (%s)", adapter_dir, out_dir, ARGS_FILE)
    return out_dir


def merge_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    adapter = require_path("--adapter", args.adapter, kind="dir", hint=ADAPTER_HINT)  # mistakes before any loading
    for name in (ARGS_FILE, ADAPTER_CONFIG_FILE):
        if not (adapter / name).is_file():
            raise UsagePathError(f"--adapter {args.adapter} has no {name}: {ADAPTER_HINT} (a full fine-tune needs no "
                                 f"merge)")
    if args.model_base:
        require_model_path("--model_base", args.model_base, hint="give the base LLM or Llava checkpoint directory")
    if Path(args.out).is_file():
        raise UsagePathError(f"--out {args.out} is a file; give a directory for the merged checkpoint")
    merge_lora(args.adapter, args.out, dtype=DTYPES[args.dtype], max_shard_size=args.max_shard_size,
               model_base=args.model_base, streaming=not args.in_memory)
    print(f"merged checkpoint written to {args.out}")
    return 0
