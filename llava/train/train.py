"""Train a LLaVA model: parse args -> build model -> data -> trainer -> train -> save.

Stage 1 (projector alignment) and stage 2 (instruction tuning) with the original LLaVA flag names:

    python -m llava.train.train --model_name_or_path LLM_DIR --vision_tower CLIP_DIR --version plain \
        --data_path blip_558k.json --image_folder images --tune_mm_mlp_adapter True \
        --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --output_dir out/pretrain
    python -m llava.train.train --model_name_or_path LLM_DIR --vision_tower CLIP_DIR --version vicuna_v1 \
        --pretrain_mm_mlp_adapter out/pretrain/mm_projector.safetensors --image_aspect_ratio pad \
        --group_by_modality_length True --data_path llava_665k.json --image_folder images --output_dir out/finetune
    python -m llava.train.train config.yaml          # the same keys in YAML

Stage 1 writes ``mm_projector.safetensors``; stage 2 a complete Llava checkpoint + processor. Both write
``llava_args.json`` (the resolved arguments) beside the weights. Check the data first with ``llava data check`` and
the same flags; ``--on_bad_sample skip`` drops what it would report and writes the counts to ``bad_samples.json``.
"""

from __future__ import annotations

import copy
import logging
import random
import sys

import numpy as np
import torch
import transformers

from llava.data.chat_templates import set_chat_template
from llava.data.collator import DataCollatorForSupervisedDataset, DataCollatorWithPacking
from llava.data.dataset import LazySupervisedDataset
from llava.data.preference import DataCollatorForPreference, PreferenceDataset
from llava.data.templates import ConversationTemplate, get_template
from llava.errors import report_usage_errors
from llava.model.builder import BuiltModel, apply_freezing, build_llava_model, set_use_cache
from llava.model.causal_padding import use_causal_padding
from llava.model.fused_layers import use_fused_rope
from llava.model.packed_attention import use_packed_sdpa
from llava.model.preference_forward import use_preference_forward
from llava.model.quantization import quantization_config
from llava.model.sequence_parallel import use_sequence_parallel
from llava.model.supervised_head import use_supervised_head
from llava.model.tiled_mlp import use_tiled_mlp
from llava.model.tower_cut import use_tower_cut
from llava.run_dir import resolved_args_dict
from llava.train.args import check_inputs, parse_args
from llava.train.distributed import finish_distributed_process
from llava.train.dpo_trainer import LLaVADPOTrainer
from llava.train.lora import setup_lora, split_trainables
from llava.train.trainer import LLaVATrainer

logger = logging.getLogger("llava.train")


def load_dtype(training_args) -> torch.dtype:
    """Weights load in bf16/fp16 only under DeepSpeed (which keeps fp32 masters); the plain Trainer autocasts."""
    if training_args.deepspeed and training_args.bf16:
        return torch.bfloat16
    if training_args.deepspeed and training_args.fp16:
        return torch.float16
    return torch.float32


def train(argv: list[str] | None = None) -> LLaVATrainer | list[dict]:
    # --- setup: arguments, logging, seed; --backend megatron: llava/megatron/backend/megatron_train.py (returns the step log)
    model_args, data_args, training_args, backend_args = parse_args(argv, with_backend=True)
    check_inputs(model_args, data_args, training_args)
    if backend_args.backend == "megatron":
        # the Megatron backend (megatron-core) only for --backend megatron
        from llava.megatron.backend.megatron_train import train_megatron

        return train_megatron(model_args, data_args, training_args, backend_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.set_seed(training_args.seed)

    # --- model, data, trainer (--training_stage dpo: preference pairs, a reference, the DPO trainer)
    if training_args.training_stage == "dpo":
        trainer, built = build_dpo_trainer(model_args, data_args, training_args)
    else:
        trainer, built = build_trainer(model_args, data_args, training_args)

    # --- train
    trainer.train(resume_from_checkpoint=_resume_arg(training_args.resume_from_checkpoint))

    # --- save: projector (stage 1) or the full Llava checkpoint + processor (stage 2), with the run's arguments
    trainer.save_state()
    set_use_cache(built.model, True)
    if uses_packed_sdpa(model_args, training_args):
        use_packed_sdpa(built.model, False)
    use_supervised_head(built.model, False)
    use_tiled_mlp(built.model, 0)
    use_fused_rope(built.model, False)
    use_preference_forward(built.model, False)
    use_causal_padding(built.model, False)
    use_sequence_parallel(built.model, 1)
    trainer.save_model(training_args.output_dir)
    _finish_wandb(training_args)
    return trainer


def build_model_and_template(model_args, data_args, training_args) -> tuple[dict, torch.nn.Module, BuiltModel,
                                                                             ConversationTemplate]:
    """The opening shared by SFT and DPO: the run's resolved arguments, the model (``build_model``) and the
    conversation template, set as the processor's chat template (saved with it: it renders these ids)."""
    run_args = resolved_args_dict(model_args, data_args, training_args)
    model, built = build_model(model_args, data_args, training_args)
    template = get_template(model_args.version, image_front=data_args.image_placement == "front")
    set_chat_template(built.processor, template, model_args.mm_use_im_start_end)
    return run_args, model, built, template


def build_trainer(model_args, data_args, training_args) -> tuple[LLaVATrainer, BuiltModel]:
    """Model (frozen as the stage says, LoRA-wrapped if asked), datasets, collator and trainer, ready to train.
    ``scripts/bench_train.py`` drives the same trainer step by step."""
    run_args, model, built, template = build_model_and_template(model_args, data_args, training_args)

    # --- data: templated, tokenized, images expanded to the tower's feature count
    train_dataset = LazySupervisedDataset.from_args(
        data_args.data_path, model_args, data_args, training_args, built, template
    )
    eval_dataset = None
    if data_args.eval_data_path:
        eval_dataset = LazySupervisedDataset.from_args(
            data_args.eval_data_path, model_args, data_args, training_args, built, template,
            data_flag="--eval_data_path")

    # --- trainer: padded batches, or padding-free rows of whole samples (--packing)
    pad_id = built.tokenizer.pad_token_id
    per_sample = bool(built.layout and built.layout.max_num_patches)  # OneVision: images per sample
    join = bool(built.video and not built.video.newline)  # LlavaNextVideo: all frames as one video (no newline)
    # --packing: with the per-sample attention each micro-batch is one row (no padding at all: attention never
    # crosses a sample boundary and its cost is per sample); with a masked row (--packing_attention mask, eager,
    # sequence parallelism) rows of at most --model_max_length, since the mask grows with the square of the row
    row_tokens = None if uses_packed_sdpa(model_args, training_args) else training_args.model_max_length
    collator = (DataCollatorWithPacking(pad_id, max_length=row_tokens, batch_num_images=per_sample, join_videos=join)
                if training_args.packing
                else DataCollatorForSupervisedDataset(pad_id, batch_num_images=per_sample, join_videos=join))
    trainer = LLaVATrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=built.processor,
        projector_only=model_args.tune_mm_mlp_adapter,
        run_args={**run_args, "num_image_tokens": built.num_image_tokens},
    )
    return trainer, built


def build_dpo_trainer(model_args, data_args, training_args) -> tuple[LLaVADPOTrainer, BuiltModel]:
    """Preference tuning: the model as for stage 2, preference pairs, and the reference: the adapter-disabled base
    (LoRA), log-probs computed once before training (--precompute_ref_log_probs), or a frozen copy."""
    run_args, model, built, template = build_model_and_template(model_args, data_args, training_args)
    ref_model, precompute = None, training_args.precompute_ref_log_probs
    if training_args.lora_enable and not precompute and split_trainables(model)[1]:
        precompute = True  # the projector / new embeddings train outside the adapters: disabling them is no reference
        logger.info("LoRA with non-LoRA trainables (%s): the reference log-probs are precomputed (an adapter-disabled "
                    "model would see the trained projector)", ", ".join(n for n, _ in split_trainables(model)[1][:3]))
    if not training_args.lora_enable and not precompute:
        ref_model = frozen_reference_copy(built.model, model_args, data_args, training_args)
    train_dataset = PreferenceDataset.from_args(data_args.data_path, model_args, data_args, training_args, built,
                                                template)
    eval_dataset = None
    if data_args.eval_data_path:
        eval_dataset = PreferenceDataset.from_args(data_args.eval_data_path, model_args, data_args, training_args,
                                                   built, template)
    per_sample = bool(built.layout and built.layout.max_num_patches)
    trainer = LLaVADPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorForPreference(built.tokenizer.pad_token_id, batch_num_images=per_sample,
                                                join_videos=bool(built.video and not built.video.newline)),
        processing_class=built.processor,
        projector_only=model_args.tune_mm_mlp_adapter,
        run_args={**run_args, "num_image_tokens": built.num_image_tokens},
        precompute_reference=precompute,
    )
    return trainer, built


def frozen_reference_copy(model: torch.nn.Module, model_args=None, data_args=None, training_args=None
                          ) -> torch.nn.Module:
    """A frozen copy of the starting model (DPO's reference for full fine-tuning), eval mode, no gradients. Under
    ZeRO-3 (parameters already partitioned) it is built again from the same inputs and seed, RNG state kept."""
    from transformers.integrations import is_deepspeed_zero3_enabled  # transformers' DeepSpeed side: only here

    if is_deepspeed_zero3_enabled() and training_args is not None:
        states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        transformers.set_seed(training_args.seed)
        ref = build_llava_model(model_args, torch_dtype=load_dtype(training_args), data_args=data_args).model
        random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])
        set_use_cache(ref, False)
    else:
        use_preference_forward(model, False)
        ref = copy.deepcopy(model)
        use_preference_forward(model)
    ref.requires_grad_(False)
    ref.eval()
    use_preference_forward(ref)
    return ref


def build_model(model_args, data_args, training_args) -> tuple[torch.nn.Module, BuiltModel]:
    """The model to train (LoRA-wrapped if asked) and what was built: vision tower + LLM + projector (LM linears
    quantized for QLoRA), frozen as the stage says, with the training forwards' patches installed."""
    dtype = load_dtype(training_args)
    qconfig = quantization_config(training_args, torch.bfloat16 if training_args.bf16 else dtype)
    built = build_llava_model(model_args, torch_dtype=dtype, quantization_config=qconfig, data_args=data_args)
    trainable = apply_freezing(built.model, model_args, added_tokens=built.added_tokens)
    model = built.model
    if training_args.lora_enable:  # adapters on the LM's linears; projector (+ new embeddings) train fully
        model = setup_lora(model, model_args, training_args, added_tokens=built.added_tokens)
        trainable = {"total": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    logger.info("trainable parameters: %s", trainable)
    set_use_cache(built.model, False)  # no KV cache while training (and packed sequences need none)
    if uses_packed_sdpa(model_args, training_args):  # attention per packed sample, no masked-out blocks computed
        use_packed_sdpa(built.model)
    use_tower_cut(built.model)  # frozen tower layers past the feature layer are not run (exact; weights untouched)
    if training_args.training_stage == "dpo":  # chosen + rejected rows in one forward, answer log-probs per row
        use_preference_forward(built.model)
    elif training_args.supervised_head:  # LM head + loss on supervised positions only (training forwards)
        use_supervised_head(built.model, chunk_rows=training_args.supervised_head_chunk_rows or None)
    if training_args.tiled_mlp_shards > 1:  # long samples: decoder MLPs a slice of the sequence at a time
        use_tiled_mlp(built.model, training_args.tiled_mlp_shards)
    if training_args.fused_rope:  # rotary embeddings written once per half (bitwise the stock forward)
        use_fused_rope(built.model)
    if training_args.skip_padding_mask and not training_args.packing:  # right-padded rows: causal attention suffices
        use_causal_padding(built.model)
    if training_args.sequence_parallel_size > 1:  # long samples: each rank of a group runs a slice of the sequence
        _ = training_args.device  # the process group (DeepSpeed's) is up before the groups are made: sets it up
        use_sequence_parallel(built.model, training_args.sequence_parallel_size)
    if training_args.gradient_checkpointing:
        built.model.enable_input_require_grads()  # frozen embeddings would otherwise cut the checkpointed graph
    return model, built


def uses_packed_sdpa(model_args, training_args) -> bool:
    return (training_args.packing and training_args.packing_attention == "per_sample"
            and model_args.attn_implementation in (None, "sdpa") and training_args.sequence_parallel_size <= 1)


def _finish_wandb(training_args) -> None:
    """Close the run, so a second ``train()`` in the same process does not log into this one."""
    if "wandb" in (training_args.report_to or []) and training_args.should_log:
        # wandb only when the run reports to it
        import wandb

        wandb.finish()


def _resume_arg(value: str | None) -> str | bool | None:
    if value is None or value.lower() in ("false", "none", ""):
        return None
    return True if value.lower() == "true" else value


def main() -> None:
    """``python -m llava.train.train FLAGS`` (what DeepSpeed launchers run): input errors as ``llava train``'s."""

    def run() -> int:
        train(sys.argv[1:])
        finish_distributed_process()
        return 0

    sys.exit(report_usage_errors("train", run))


if __name__ == "__main__":
    main()
