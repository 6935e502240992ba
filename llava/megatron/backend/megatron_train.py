"""``llava train --backend megatron``: LLaVA under megatron-core tensor/pipeline parallelism, from HF weights.

    torchrun --nproc_per_node 2 -m llava.train.train --backend megatron --tensor_model_parallel_size 2 \
        --model_name_or_path LLM --vision_tower CLIP --version plain --data_path d.json --image_folder images \
        --tune_mm_mlp_adapter True --output_dir out/pretrain           # same model/data/stage flags as DeepSpeed

Reads top to bottom: setup (process groups, CPU shims, RNG) -> the initial HF checkpoint (a Llava checkpoint as
given, or the composition the hf backend would build, written once by rank 0) -> model chunks (``LlavaGPTModel``)
loaded per rank through the conversion templates -> freezing -> megatron-core ``DistributedDataParallel``,
``get_megatron_optimizer``, ``OptimizerParamScheduler`` -> steps driven by ``get_forward_backward_func()`` ->
export (``--save_hf``) as the hf backend writes it. The data pipeline (templates, tokenization, collation) and the
sample order are the hf backend's, so both backends see the same batches. Per-step losses are logged to
``megatron_state.json`` (``log_history``, as ``trainer_state.json``) and, with ``--report_to wandb``, to wandb;
rank 0 draws them (``curves.png``, ``llava/curves.py``) at the end and in each checkpoint, as the hf backend does.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from transformers import LlavaConfig

from llava.curves import CurvesWriter
from llava.errors import UsageValueError
from llava.megatron.backend.cpu_compat import install_cpu_shims
from llava.megatron.backend.init_checkpoint import prepare_init_checkpoint
from llava.megatron.backend.megatron_args import LR_SCHEDULERS, check_megatron_combinations, trains_new_embeddings
from llava.megatron.backend.megatron_checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from llava.megatron.backend.megatron_data import StepBatches, build_dataset, load_processor_bits
from llava.megatron.backend.megatron_export import export_run
from llava.megatron.backend.megatron_model import LlavaGPTModel, transformer_config
from llava.megatron.backend.megatron_steps import evaluate_loss, optimizer_group_parts, run_steps, write_state
from llava.megatron.backend.rank_memory import gather_memory
from llava.megatron.backend.rank_weights import hf_mca_config, load_rank_state, read_rank_state
from llava.megatron.converter.parallel_layout import ParallelLayout, padded_vocab_size

logger = logging.getLogger("llava.megatron")
VOCAB_DIVISOR = 1  # pad the vocabulary only to a multiple of TP; padded logits are masked out of the loss


def train_megatron(model_args, data_args, training_args, mg_args) -> list[dict]:
    """Train; returns the log history (one entry per step: step, loss, grad_norm, learning_rate)."""
    check_megatron_combinations(model_args, data_args, training_args, mg_args)
    tp, pp = mg_args.tensor_model_parallel_size, mg_args.pipeline_model_parallel_size
    world = (torch.distributed.get_world_size() if torch.distributed.is_initialized()
             else int(os.environ.get("WORLD_SIZE", "1")))  # what torchrun launched (1 without a launcher)
    if world % (tp * pp):
        raise UsageValueError(f"{world} process(es) launched, not a multiple of --tensor_model_parallel_size {tp} x "
                              f"--pipeline_model_parallel_size {pp}: launch with torchrun --nproc_per_node "
                              f"{tp * pp} (or a multiple), or lower them")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # --- setup: process groups, CPU shims, model-parallel RNG
    _init_process_group()
    shims = install_cpu_shims()
    if shims:
        logger.info("no GPU: megatron-core CPU shims installed (%s)", ", ".join(shims))
    vpp = mg_args.virtual_pipeline_model_parallel_size if (mg_args.virtual_pipeline_model_parallel_size or 1) > 1 \
        else None
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp)
    tensor_parallel.model_parallel_cuda_manual_seed(training_args.seed)
    transformers.set_seed(training_args.seed)

    # --- the initial HF checkpoint and this rank's share of it
    resume = resolve_resume(training_args.output_dir, training_args.resume_from_checkpoint)
    hf_dir, run_facts = prepare_init_checkpoint(model_args, training_args, reuse=resume is not None)
    chunks, layout, padded = build_model_chunks(hf_dir, mg_args, training_args)
    trainable = apply_freezing(chunks, model_args, run_facts["added_tokens"])
    logger.info("rank %d trainable parameters: %s", torch.distributed.get_rank(), trainable)

    # --- data (the hf backend's dataset and order), then megatron-core DDP, optimizer, scheduler
    processor, bits = load_processor_bits(hf_dir, model_args)
    dataset = build_dataset(data_args.data_path, model_args, data_args, training_args, processor, bits)
    steps = StepBatches(dataset, processor.tokenizer.pad_token_id, training_args,
                        parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank(),
                        pad_multiple=tp if mg_args.sequence_parallel else 1, min_micro=pp if vpp else 1)
    total_steps = training_args.max_steps
    if total_steps <= 0:  # as transformers counts them: ceil(epochs x optimizer steps per epoch)
        total_steps = math.ceil(training_args.num_train_epochs * steps.steps_per_epoch)
    model, optimizer, scheduler = build_optimizer(chunks, training_args, total_steps)

    evaluate, eval_every = None, 0
    if data_args.eval_data_path and _eval_every(training_args):
        eval_set = build_dataset(data_args.eval_data_path, model_args, data_args, training_args, processor, bits)
        eval_batches = steps.eval_batches(eval_set, training_args.per_device_eval_batch_size)
        evaluate, eval_every = (lambda: evaluate_loss(model, eval_batches)), _eval_every(training_args)

    # --- train (from a checkpoint: weights, optimizer, scheduler, RNG, step), saving every --save_steps
    start_step, history = load_checkpoint(resume, model, optimizer, scheduler, layout) if resume else (0, [])
    if resume:
        logger.info("resumed from %s at step %d", resume, start_step)

    curves = CurvesWriter(logger)  # curves.png (rank 0) at each save; without matplotlib, said once

    def save(step: int, history: list[dict]) -> None:
        final = Path(training_args.output_dir, f"checkpoint-{step}")
        save_checkpoint(training_args.output_dir, step, model, optimizer, scheduler, history, layout, padded,
                        VOCAB_DIVISOR, hf_dir, training_args.save_total_limit,
                        on_staged=lambda staging: curves(staging, history, title=str(final)))

    wandb_run = start_wandb(training_args, mg_args)
    history = run_steps(model, optimizer, scheduler, steps, total_steps, training_args, start_step, history,
                        save=save, save_every=_save_every(training_args, total_steps), evaluate=evaluate,
                        eval_every=eval_every, log=wandb_run.log if wandb_run else None,
                        lr_parts=optimizer_group_parts(model, optimizer))
    write_state(training_args.output_dir, history, gather_memory(model, optimizer))
    if torch.distributed.get_rank() == 0:
        curves(training_args.output_dir, history)
    if wandb_run:
        wandb_run.finish()

    # --- save: MCA shards of every rank, then the HF export on rank 0
    if mg_args.save_hf:
        export_run(model, layout, padded, VOCAB_DIVISOR, hf_dir, training_args.output_dir, model_args, data_args,
                   training_args, mg_args, run_facts)
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()  # a later run in this process may pick another layout
    return history


def _init_process_group() -> None:
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend, timeout=timedelta(minutes=30))


def build_model_chunks(hf_dir: Path, mg_args, training_args):
    """This rank's ``LlavaGPTModel`` chunk(s) (one per virtual stage), weights read through the templates."""

    _, mca, _ = hf_mca_config(hf_dir)
    tp, pp = mg_args.tensor_model_parallel_size, mg_args.pipeline_model_parallel_size
    vpp = mg_args.virtual_pipeline_model_parallel_size if (mg_args.virtual_pipeline_model_parallel_size or 1) > 1 \
        else None
    layout = ParallelLayout(tp, pp, vpp, mca["num_layers"], mca["share_embeddings_and_output_weights"])
    padded = padded_vocab_size(mca["vocab_size"], tp, VOCAB_DIVISOR)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    config = transformer_config(mca, tp=tp, pp=pp, vpp=vpp, sequence_parallel=mg_args.sequence_parallel, dtype=dtype,
                                variable_seq_lengths=False)
    hf_config = LlavaConfig.from_pretrained(hf_dir)
    pp_rank, tp_rank = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    chunks = []
    for vp in range(layout.num_vp):
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        chunk = LlavaGPTModel(config, mca, padded, hf_config, pre_process=first, post_process=last,
                              vp_stage=vp if vpp else None)
        chunks.append(chunk)
    load_rank_state(chunks, read_rank_state(hf_dir, layout, tp_rank, pp_rank, padded))
    if torch.cuda.is_available():  # built and loaded on the CPU (use_cpu_initialization), trained on the rank's GPU
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    return chunks, layout, padded


def apply_freezing(chunks, model_args, added_tokens: int) -> dict[str, int]:
    """The hf backend's freezing policy (``llava.model.builder.apply_freezing``) on MCA module names."""
    tune_llm = not (model_args.tune_mm_mlp_adapter or model_args.freeze_backbone)
    tune_projector = not model_args.freeze_mm_mlp_adapter
    tune_vision = model_args.unfreeze_mm_vision_tower and not model_args.tune_mm_mlp_adapter
    tune_embeddings = trains_new_embeddings(model_args, added_tokens)
    counts = {"vision_tower": 0, "projector": 0, "language_model": 0}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if name.startswith("vision_model."):
                param.requires_grad_(tune_vision)
                part = "vision_tower"
            elif name.startswith("multi_modal_projector."):
                param.requires_grad_(tune_projector)
                part = "projector"
            else:
                # with tied embeddings at PP > 1 the last stage holds a copy of the word embeddings: it trains with
                # them (megatron-core all-reduces the two copies' gradients, and waits forever for a frozen one)
                embedding = name == "embedding.word_embeddings.weight" or (
                    name == "output_layer.weight" and chunk.share_embeddings_and_output_weights)
                param.requires_grad_(tune_llm or (embedding and tune_embeddings))
                part = "language_model"
            counts[part] += param.numel() if param.requires_grad else 0
    return counts


def build_optimizer(chunks, training_args, total_steps: int):
    """megatron-core DDP around each chunk, ``get_megatron_optimizer`` (torch AdamW on CPU) and its scheduler,
    set to what ``transformers.Trainer`` does with the same flags (AdamW, clipping, linear/cosine decay)."""

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    model = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in chunks]
    opt_config = OptimizerConfig(
        optimizer="adam", lr=training_args.learning_rate, min_lr=0.0, weight_decay=training_args.weight_decay,
        adam_beta1=training_args.adam_beta1, adam_beta2=training_args.adam_beta2, adam_eps=training_args.adam_epsilon,
        clip_grad=training_args.max_grad_norm or 0.0, bf16=training_args.bf16, params_dtype=chunks[0].config.params_dtype,
        use_distributed_optimizer=False,
    )
    overrides = get_standard_config_overrides(opt_config)  # no weight decay on biases and 1-D weights
    if training_args.mm_projector_lr is not None:  # the projector's own peak LR, decayed by the same schedule
        overrides[ParamKey(name="*multi_modal_projector.*")] = {"max_lr": training_args.mm_projector_lr,
                                                                "min_lr": 0.0}
    optimizer = get_megatron_optimizer(opt_config, model, config_overrides=overrides)
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss if training_args.bf16 else None
    warmup = training_args.get_warmup_steps(total_steps)
    style = LR_SCHEDULERS[str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type))]
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=training_args.learning_rate, min_lr=0.0, lr_warmup_steps=warmup,
        lr_decay_steps=total_steps, lr_decay_style=style, start_wd=training_args.weight_decay,
        end_wd=training_args.weight_decay, wd_incr_steps=total_steps, wd_incr_style="constant",
    )
    return model, optimizer, scheduler


def _save_every(training_args, total_steps: int) -> int:
    """Steps between checkpoints (0: none), as transformers reads --save_strategy / --save_steps."""
    if str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) != "steps":
        return 0
    every = training_args.save_steps
    return int(every) if every >= 1 else math.ceil(total_steps * every)



def _eval_every(training_args) -> int:
    """Steps between evaluations under --eval_strategy steps (--eval_steps, else --logging_steps); 0: none."""
    if str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "steps":
        return 0
    return int(training_args.eval_steps or training_args.logging_steps)


def start_wandb(training_args, mg_args):
    """With ``--report_to wandb``: a run on rank 0 logging ``train/loss``, ``train/grad_norm``,
    ``train/learning_rate`` and ``eval/loss`` per step, as transformers' WandbCallback names them."""
    if "wandb" not in (training_args.report_to or []) or torch.distributed.get_rank() != 0:
        return None
    # wandb only when the run reports to it
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), name=training_args.run_name,
                     dir=training_args.output_dir, config={**training_args.to_dict(), **vars(mg_args)})

    def log(entry: dict) -> None:
        names = {"loss": "train/loss", "grad_norm": "train/grad_norm", "learning_rate": "train/learning_rate",
                 "eval_loss": "eval/loss"}
        run.log({names[k]: v for k, v in entry.items() if k in names} | {"train/global_step": entry["step"]})

    return SimpleNamespace(log=log, finish=run.finish)
