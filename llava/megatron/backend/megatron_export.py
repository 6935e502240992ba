"""End of a Megatron run: every rank writes its MCA shards, rank 0 exports what the hf backend writes.

    export_run(model, layout, padded, divisor, hf_dir, output_dir, model_args, ...)

``OUTPUT_DIR/megatron/`` holds the trained weights in the converter's layout (``llava convert mcore2hf`` reads it;
each rank writes its own ``mp_rank_XX_YYY`` files, data-parallel rank 0 only). Then, like the hf backend: stage 1
(``--tune_mm_mlp_adapter``) writes ``mm_projector.safetensors`` (with ``embed_tokens.weight`` when stage 1 trained
the new tokens' embeddings, ``--mm_use_im_start_end``); otherwise the MCA shards are streamed through the
conversion templates (``mcore_to_hf``) into a native ``LlavaForConditionalGeneration`` checkpoint + processor in
``OUTPUT_DIR``; both with ``llava_args.json``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlavaConfig

from llava.megatron.backend.megatron_args import trains_new_embeddings
from llava.megatron.backend.rank_weights import write_mca_meta, write_rank_shards
from llava.megatron.converter.mcore_convert import chunk_file, mcore_to_hf
from llava.megatron.converter.parallel_layout import EMBEDDING
from llava.model.builder import num_image_tokens
from llava.model.projector import save_projector_state
from llava.run_dir import PROJECTOR_FILE, resolved_args_dict, training_run_kind, write_run_args

MCA_DIR = "megatron"


def export_run(model, layout, padded: int, divisor: int, hf_dir: Path, output_dir: str, model_args, data_args,
               training_args, mg_args, facts: dict) -> None:
    # megatron-core (the [megatron] extra), imported only when the backend runs
    from megatron.core import parallel_state

    out = Path(output_dir)
    mca_dir = out / MCA_DIR
    if torch.distributed.get_rank() == 0 and mca_dir.exists():
        shutil.rmtree(mca_dir)
    torch.distributed.barrier()
    write_rank_shards(mca_dir, [m.module for m in model], layout, parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_pipeline_model_parallel_rank(),
                      write=parallel_state.get_data_parallel_rank() == 0)
    torch.distributed.barrier()
    if torch.distributed.get_rank() != 0:
        return
    write_mca_meta(mca_dir, hf_dir, layout, padded, divisor)
    config = LlavaConfig.from_pretrained(hf_dir)
    if model_args.tune_mm_mlp_adapter:
        first = load_file(mca_dir / chunk_file(0, 0, 0))
        prefix = "multi_modal_projector."
        state = {k[len(prefix):]: v for k, v in first.items() if k.startswith(prefix)}
        if trains_new_embeddings(model_args, facts["added_tokens"]):  # the vocab-parallel rows of every TP rank
            rows = [load_file(mca_dir / chunk_file(tp, 0, 0))[EMBEDDING] for tp in range(layout.tp)]
            state["embed_tokens.weight"] = torch.cat(rows)[: config.text_config.vocab_size]
        save_projector_state(state, out / PROJECTOR_FILE)
    else:
        staging = out / ".hf_export.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        mcore_to_hf(mca_dir, staging)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
        staging.rmdir()
    run_args = {**resolved_args_dict(model_args, data_args, training_args), "megatron_args": vars(mg_args),
                "num_image_tokens": num_image_tokens(config.vision_config, config.vision_feature_select_strategy)}
    kind = training_run_kind(projector_only=model_args.tune_mm_mlp_adapter, lora_enable=False)
    write_run_args(out, run_args, {"projector_only": model_args.tune_mm_mlp_adapter, "run_kind": kind.value,
                                   "backend": "megatron"})
