"""The Hugging Face checkpoint the Megatron backend starts from, as the hf backend would build it.

    hf_dir, facts = prepare_init_checkpoint(model_args, training_args)   # every rank; rank 0 does the work

A Llava checkpoint (``--model_name_or_path``) that needs nothing added is used as it is. Otherwise (an LLM plus
``--vision_tower``, a stage-1 projector to load, tokens to add) rank 0 builds the model exactly as the hf backend
does (``build_llava_model`` after ``transformers.set_seed(--seed)``: same projector initialisation, same
mean-resized new embeddings) and writes it once to ``OUTPUT_DIR/megatron_init/`` with its processor. Every rank
then reads only its own shards from that directory (``llava.megatron.weights``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from llava.model.builder import _is_llava_checkpoint, add_multimodal_tokens, build_llava_model

INIT_DIR = "megatron_init"
FACTS_FILE = "megatron_init.json"  # where the run started from: [directory, {"added_tokens": n}]


def _usable_as_is(model_args) -> bool:
    if model_args.pretrain_mm_mlp_adapter or not _is_llava_checkpoint(model_args.model_name_or_path,
                                                                       model_args.trust_remote_code):
        return False
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    return add_multimodal_tokens(tokenizer, model_args.mm_use_im_start_end) == 0


def prepare_init_checkpoint(model_args, training_args, reuse: bool = False) -> tuple[Path, dict]:
    """(directory of the initial native Llava checkpoint, {"added_tokens": n}). ``reuse`` (resuming): take the one
    an earlier run wrote into the same output directory."""
    result: list = [None]
    facts_file = Path(training_args.output_dir) / FACTS_FILE
    if torch.distributed.get_rank() == 0:
        if reuse and facts_file.is_file():
            result[0] = tuple(json.loads(facts_file.read_text()))
        elif _usable_as_is(model_args):
            result[0] = (str(model_args.model_name_or_path), {"added_tokens": 0})
        else:
            out = Path(training_args.output_dir) / INIT_DIR
            transformers.set_seed(training_args.seed)  # what the hf backend's train() does before building
            dtype = torch.bfloat16 if training_args.bf16 else torch.float32
            built = build_llava_model(model_args, torch_dtype=dtype)
            built.model.save_pretrained(out)
            built.processor.save_pretrained(out)
            result[0] = (str(out), {"added_tokens": built.added_tokens})
            del built
        facts_file.parent.mkdir(parents=True, exist_ok=True)
        facts_file.write_text(json.dumps(result[0]))
    torch.distributed.broadcast_object_list(result, src=0)
    path, facts = result[0]
    return Path(path), facts
