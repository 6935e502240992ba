"""Flags of the Megatron backend (``llava train --backend megatron ...``) and the combinations it refuses.

    torchrun --nproc_per_node 2 -m llava.train.train --backend megatron --tensor_model_parallel_size 2 \
        --pipeline_model_parallel_size 1 [--virtual_pipeline_model_parallel_size V] [--sequence_parallel True] \
        <the model, data and stage flags of the DeepSpeed path>

The world size must be a multiple of TP x PP (the rest is data parallelism). Every check runs at start-up, before
any weight is read, with the flag names in the message. Nothing here imports megatron-core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("hf", "megatron")
LR_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


@dataclass
class MegatronArguments:
    backend: str = field(default="hf", metadata={"help": "hf (transformers Trainer, DeepSpeed) or megatron "
                                                         "(megatron-core TP/PP, launched with torchrun)"})
    tensor_model_parallel_size: int = field(default=1, metadata={"help": "megatron: tensor-parallel ranks"})
    pipeline_model_parallel_size: int = field(default=1, metadata={"help": "megatron: pipeline stages"})
    virtual_pipeline_model_parallel_size: int | None = field(
        default=None, metadata={"help": "megatron: model chunks per pipeline stage (interleaved schedule)"})
    sequence_parallel: bool = field(default=False, metadata={"help": "megatron: split activations over TP ranks "
                                                                     "along the sequence (needs TP > 1)"})
    save_hf: bool = field(default=True, metadata={"help": "megatron: export the result as the hf backend writes it "
                                                          "(native Llava checkpoint; stage 1: the projector)"})

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        tp, pp, vpp = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                       self.virtual_pipeline_model_parallel_size)
        if self.backend == "hf":
            if (tp, pp, vpp, self.sequence_parallel) != (1, 1, None, False):
                raise ValueError("--tensor_model_parallel_size, --pipeline_model_parallel_size, "
                                 "--virtual_pipeline_model_parallel_size and --sequence_parallel need --backend megatron")
            return
        if tp < 1 or pp < 1 or (vpp is not None and vpp < 1):
            raise ValueError(f"--tensor_model_parallel_size / --pipeline_model_parallel_size / "
                             f"--virtual_pipeline_model_parallel_size must be >= 1, got {tp}, {pp}, {vpp}")
        if vpp is not None and vpp > 1 and pp == 1:
            raise ValueError("--virtual_pipeline_model_parallel_size needs --pipeline_model_parallel_size > 1")
        if self.sequence_parallel and tp == 1:
            raise ValueError("--sequence_parallel needs --tensor_model_parallel_size > 1")


def check_megatron_combinations(model_args, data_args, training_args, mg_args: MegatronArguments) -> None:
    """What the Megatron backend does not do, refused at start-up (the hf backend does all of these)."""
    from llava.data.video_flags import video_enabled  # a mixture entry's video_folder turns video on too

    optim, scheduler = _value(training_args.optim), _value(training_args.lr_scheduler_type)
    refused = {
        "--lora_enable True (LoRA/QLoRA: use the hf backend)": training_args.lora_enable,
        f"--bits {training_args.bits} (quantized training: use the hf backend)": training_args.bits != 16,
        "--deepspeed (the megatron backend replaces DeepSpeed; drop the flag)": bool(training_args.deepspeed),
        "--gradient_checkpointing True (not wired to megatron-core recompute yet)": training_args.gradient_checkpointing,
        "--fp16 True (use --bf16 True or fp32)": training_args.fp16,
        "--bf16 True without a GPU (megatron-core's mixed-precision optimizer takes CUDA tensors only: train in fp32 "
        "on CPU)": training_args.bf16 and not _has_gpu(),
        f"--optim {optim} (megatron-core's Adam is torch AdamW: use adamw_torch)":
            optim not in ("adamw_torch", "adamw_torch_fused"),
        f"--lr_scheduler_type {scheduler} (supported: {', '.join(LR_SCHEDULERS)})": scheduler not in LR_SCHEDULERS,
        f"--virtual_pipeline_model_parallel_size with --gradient_accumulation_steps "
        f"{training_args.gradient_accumulation_steps} (the interleaved schedule needs at least "
        f"--pipeline_model_parallel_size micro-batches per step)":
            (mg_args.virtual_pipeline_model_parallel_size or 1) > 1
            and training_args.gradient_accumulation_steps < mg_args.pipeline_model_parallel_size,
        "--eval_strategy epoch / --save_strategy epoch (use steps)":
            "epoch" in (_value(training_args.eval_strategy), _value(training_args.save_strategy)),
        "--attn_implementation other than sdpa/eager (the LM runs megatron-core attention)":
            model_args.attn_implementation not in (None, "sdpa", "eager"),
        f"--image_aspect_ratio {data_args.image_aspect_ratio} (LlavaNext / LlavaOnevision: use the hf backend)":
            str(data_args.image_aspect_ratio).startswith("anyres"),
        "--video_folder (video: LlavaOnevision / LlavaNextVideo: use the hf backend)": video_enabled(data_args),
        "--training_stage dpo (preference tuning: use the hf backend)":
            getattr(training_args, "training_stage", "sft") == "dpo",
        "--tiled_mlp_shards (the LM runs megatron-core's MLP)": getattr(training_args, "tiled_mlp_shards", 0) > 1,
        "--sequence_parallel_size (Ulysses sequence parallelism of the hf backend; megatron-core: "
        "--context_parallel_size is not wired either)": getattr(training_args, "sequence_parallel_size", 1) > 1,
        "--mm_vision_tower_lr / --mm_vision_tower_lr_decay (parameter groups of the hf backend's optimizer)":
            getattr(training_args, "mm_vision_tower_lr", None) is not None
            or getattr(training_args, "mm_vision_tower_lr_decay", None) is not None,
    }
    bad = [flag for flag, hit in refused.items() if hit]
    if bad:
        from llava.errors import UsageValueError  # one line from `llava train`, exit code 2

        raise UsageValueError("--backend megatron does not support: " + "; ".join(bad))


def trains_new_embeddings(model_args, added_tokens: int) -> bool:
    """Stage 1 with ``--mm_use_im_start_end`` trains the input embeddings (the new tokens' rows) with the projector
    and saves them beside it, as the hf backend does (``llava.model.builder.apply_freezing``, ``LLaVATrainer``)."""
    return bool(model_args.tune_mm_mlp_adapter and model_args.mm_use_im_start_end and added_tokens > 0)


def _has_gpu() -> bool:
    # train/args.py imports this module (`llava train` flag checks): torch only for the bf16 check
    import torch

    return torch.cuda.is_available()


def _value(option) -> str:
    """The flag's text for a transformers enum option (``OptimizerNames.SGD`` -> ``sgd``) or a plain string."""
    return str(getattr(option, "value", option))
