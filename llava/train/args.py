"""Training arguments: three dataclasses parsed by ``HfArgumentParser``, flag names as in the original LLaVA.

    python -m llava.train.train --model_name_or_path LLM --vision_tower CLIP --version plain --data_path d.json \
        --image_folder images --tune_mm_mlp_adapter True --output_dir out/pretrain
    python -m llava.train.train config.yaml [--flag value ...]      # YAML with the same keys; flags override

Bad combinations fail here, at start-up, with the flag names in the message. ``ModelArguments`` (how the model is
built) lives in ``llava/model/model_args.py``, so export and serve rebuild it from a run without importing ``llava.train``;
``llava/run_dir.py``'s ``resolved_args_dict`` is what it stores beside the weights (``llava_args.json``).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import transformers
import yaml

from llava.data.anyres import check_anyres_flags, parse_image_aspect_ratio
from llava.data.sources import source_specs
from llava.data.templates import get_template
from llava.data.video_flags import check_video_flags
from llava.errors import RaiseOnUsageError, UsagePathError, UsageValueError, one_line, require_model_path, require_path
from llava.megatron.backend.megatron_args import MegatronArguments
from llava.model.model_args import ModelArguments
from llava.train.distributed import release_deepspeed_shm, repair_cpu_process_state, wants_cpu_ddp

logger = logging.getLogger("llava.train")


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={
        "help": "LLaVA JSON/JSONL, Parquet, a `datasets` directory, or a LLaVA-NeXT mixture YAML (seeded by --seed)"})
    image_folder: str | None = field(default=None, metadata={"help": "root that image paths are relative to"})
    image_aspect_ratio: str = field(default="square", metadata={
        "help": "pad (to square, mean colour), square, anyres (LLaVA-NeXT tiles -> LlavaNext) or anyres_max_N "
                "(OneVision: at most ~N crops of features -> LlavaOnevision)"})
    image_grid_pinpoints: str | None = field(default=None, metadata={
        "help": "anyres grids as LLaVA-NeXT writes them: '(1x1),...,(3x3)' (width x height) in units of the tower's "
                "input size, or '[[336, 672], [672, 336]]' [width, height] pixels; default (1x2),(2x1),(2x2),(3x1),(1x3) for anyres, (1x1),...,(6x6) for anyres_max_N"})
    eval_data_path: str | None = field(default=None, metadata={"help": "held-out records (as --data_path)"})
    on_bad_sample: str = field(default="error", metadata={"help": "error: stop before training; skip: drop, count"})
    image_placement: str = field(default="front", metadata={
        "help": "front: a record's single <image> moves to the front of its turn (\"<image>\\n\" + text), as "
                "LLaVA-1.5/NeXT train; keep: the record's own placement (multi-image records always keep theirs)"})
    index_cache_dir: str | None = field(default=None, metadata={
        "help": "where the dataset index (exact lengths, modality, validation) and the Arrow copy of JSON/JSONL records "
                "are cached, keyed by content + tokenizer + template + image settings + max length; default "
                "$LLAVA_CACHE/index or ~/.cache/llava/index; none: compute every start, records in memory"})
    index_workers: int = field(default=0, metadata={"help": "processes that compute a missing index (0: one per CPU, "
                                                            "at most 8)"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted for LLaVA scripts; always lazy"})
    is_multimodal: bool = field(default=True, metadata={"help": "accepted for LLaVA scripts"})
    video_folder: str | None = field(default=None, metadata={
        "help": "root that records' \"video\" paths (files, or directories of frames) are relative to; turns video on "
                "(LlavaOnevision or LlavaNextVideo, by --mm_newline_position)"})
    frames_upbound: int = field(default=0, metadata={
        "help": "video: at most this many frames, evenly spaced, when --video_fps gives more (0: no cap)"})
    video_fps: float = field(default=1.0, metadata={"help": "video: frames sampled per second of video"})
    force_sample: bool = field(default=False, metadata={
        "help": "video: always --frames_upbound frames, evenly spaced (LLaVA-NeXT's meaning)"})
    add_time_instruction: bool = field(default=False, metadata={
        "help": "video: LLaVA-NeXT's sentence with the video's length and the sampled frames' times before the question"})

    def __post_init__(self):
        if self.data_path is None:
            raise ValueError("--data_path is required")
        if self.frames_upbound < 0 or self.video_fps <= 0:
            raise ValueError(f"--frames_upbound must be >= 0 and --video_fps > 0, got {self.frames_upbound} and "
                             f"{self.video_fps}")
        if self.force_sample and self.frames_upbound < 1:
            raise ValueError("--force_sample True samples --frames_upbound frames: give --frames_upbound N (N >= 1)")
        mode, _ = parse_image_aspect_ratio(self.image_aspect_ratio)
        if self.image_grid_pinpoints is not None and mode != "anyres":
            raise ValueError(f"--image_grid_pinpoints {self.image_grid_pinpoints!r} needs --image_aspect_ratio anyres "
                             f"or anyres_max_N, got {self.image_aspect_ratio}")
        if self.image_placement not in ("front", "keep"):
            raise ValueError(f"--image_placement must be front or keep, got {self.image_placement}")
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"--on_bad_sample must be error or skip, got {self.on_bad_sample}")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "longer samples are cut after their images"})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "separate learning rate for the projector"})
    mm_vision_tower_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the vision tower when it trains (OneVision: 2e-6); its own parameter group"})
    mm_vision_tower_lr_decay: float | None = field(default=None, metadata={
        "help": "layer-wise decay in (0, 1]: tower layer k of L trains at lr * decay^(L-k), embeddings at decay^L"})
    group_by_modality_length: bool = field(default=False, metadata={"help": "batches of one modality, like lengths"})
    packing: bool = field(default=False, metadata={
        "help": "padding-free: concatenate each batch's samples, attention kept per sample: one row under the "
                "per-sample attention, else rows of at most --model_max_length"})
    training_stage: str = field(default="sft", metadata={
        "help": "sft: supervised (stage 1 / stage 2); dpo: preference tuning on {prompt, chosen, rejected} records "
                "(what `llava dpo` and `python -m llava.train.train_dpo` set)"})
    beta: float = field(default=0.1, metadata={"help": "DPO: temperature of the preference loss (IPO: its tau)"})
    dpo_alpha: float = field(default=1.0, metadata={"help": "DPO: weight of the preference loss"})
    gamma: float = field(default=1.0, metadata={
        "help": "DPO: weight of the SFT loss on the chosen answer (LLaVA-NeXT's default 1.0; its dpo_ov7b.sh uses 0)"})
    loss_type: str = field(default="sigmoid", metadata={"help": "DPO: sigmoid (DPO) or ipo"})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "DPO: one pass of the starting model before training stores every pair's reference log-probs in the "
                "run directory (ref_logps.safetensors; a resume reads it), so training holds no reference model"})
    packing_attention: str = field(default="per_sample", metadata={
        "help": "with --packing and sdpa: per_sample (SDPA on each sample, no masked-out work; faster unless the CPU "
                "is oversubscribed) or mask (stock sdpa, block-diagonal mask of the whole row)"})
    supervised_head: bool = field(default=True, metadata={
        "help": "training loss from the supervised positions only: LM head + cross-entropy on the hidden states whose "
                "shifted label is supervised, in chunks, no full-vocabulary logits (same loss and gradients); False: "
                "the stock head over every position. Eval and predict always get full logits"})
    skip_padding_mask: bool = field(default=True, metadata={
        "help": "training forwards of right-padded batches under sdpa drop the padding mask: causal attention alone "
                "keeps real tokens from the pads after them (same loss and gradients), and SDPA runs unmasked with "
                "grouped-query heads (no [B,1,T,T] mask, no copied key/value heads); False: the stock masked attention"})
    fused_rope: bool = field(default=True, metadata={
        "help": "training forwards of Llama / Qwen2 / Mistral attention apply rotary embeddings in one pass over q "
                "and k (bitwise the stock forward; no rotate_half copies); False: transformers' apply_rotary_pos_emb"})
    tiled_mlp_shards: int = field(default=0, metadata={
        "help": "long samples: each decoder MLP runs N slices of the sequence at a time, activations recomputed per "
                "slice in the backward pass (peak MLP memory / N, one more MLP forward; same loss). 0: off"})
    supervised_head_chunk_rows: int = field(default=0, metadata={
        "help": "rows per chunk of the supervised head's tiled linear + cross-entropy (its logits tile); 0: "
                "2^24 / vocabulary size"})
    sequence_parallel_size: int = field(default=1, metadata={
        "help": "long samples under --deepspeed: N ranks share each batch and split its merged sequence (Ulysses: "
                "all-to-all of the attention heads); data-parallel size = processes / N. N must divide the processes "
                "and the LM's attention and key/value heads. 1: off"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "must stay False (multimodal batches)"})
    cache_dir: str | None = field(default=None, metadata={"help": "accepted for LLaVA scripts"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer (transformers' names), as in LLaVA"})
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "LLaVA scripts' flag (removed in transformers 5): --warmup_steps as a ratio"}
    )
    lora_enable: bool = field(default=False, metadata={"help": "LoRA on every linear layer of the language model"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_weight_path: str = field(default="", metadata={"help": "accepted for LLaVA scripts; must be empty"})
    lora_bias: str = field(default="none", metadata={"help": "none | all (every LM bias) | lora_only (LoRA layers')"})
    bits: int = field(default=16, metadata={"help": "16, or 8/4 for QLoRA (bitsandbytes; needs --lora_enable)"})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA: quantize the quantization constants"})
    quant_type: str = field(default="nf4", metadata={"help": "QLoRA 4-bit type: nf4 or fp4"})

    def __post_init__(self):
        self.deepspeed = _bundled_deepspeed_config(self.deepspeed)
        if wants_cpu_ddp(self.deepspeed):  # torchrun on CPU: accelerate's MULTI_CPU (gloo) path, see distributed.py
            self.use_cpu = True
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1 or self.warmup_steps:
                raise ValueError(f"--warmup_ratio must be in [0, 1) and not combined with --warmup_steps, got "
                                 f"{self.warmup_ratio} and {self.warmup_steps}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must be False: the collator builds pixel_values itself")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise ValueError(f"--lora_bias must be none, all or lora_only, got {self.lora_bias}")
        if self.bits not in (16, 8, 4):
            raise ValueError(f"--bits must be 16, 8 or 4, got {self.bits}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"--quant_type must be nf4 or fp4, got {self.quant_type}")
        if self.bits != 16 and not self.lora_enable:
            raise ValueError(f"--bits {self.bits} trains quantized weights only through adapters: add --lora_enable True")
        if self.lora_enable and (self.lora_r < 1 or not 0 <= self.lora_dropout < 1):
            raise ValueError(f"--lora_r must be >= 1 and --lora_dropout in [0, 1), got {self.lora_r}, {self.lora_dropout}")
        if self.lora_weight_path:
            raise ValueError("--lora_weight_path is not supported: continue from a merged checkpoint instead")
        if self.mm_vision_tower_lr_decay is not None and not 0 < self.mm_vision_tower_lr_decay <= 1:
            raise ValueError(f"--mm_vision_tower_lr_decay must be in (0, 1], got {self.mm_vision_tower_lr_decay}")
        self._check_preference_flags()
        if self.packing_attention not in ("per_sample", "mask"):
            raise ValueError(f"--packing_attention must be per_sample or mask, got {self.packing_attention}")
        if self.tiled_mlp_shards < 0 or self.supervised_head_chunk_rows < 0:
            raise ValueError(f"--tiled_mlp_shards and --supervised_head_chunk_rows must be >= 0, got "
                             f"{self.tiled_mlp_shards} and {self.supervised_head_chunk_rows}")
        if self.supervised_head_chunk_rows and not self.supervised_head:
            raise ValueError("--supervised_head_chunk_rows needs --supervised_head True")
        self._check_sequence_parallel_flags()

    def _check_sequence_parallel_flags(self) -> None:
        n = self.sequence_parallel_size
        if n < 1:
            raise ValueError(f"--sequence_parallel_size must be >= 1, got {n}")
        if n == 1:
            return
        refused = {"--training_stage dpo (chosen and rejected rows are one padded batch)": self.training_stage == "dpo",
                   "--packing_attention mask (packed rows are cut per sample)":
                       self.packing and self.packing_attention == "mask",
                   "no --deepspeed (ZeRO-1/2/3 only)": not self.deepspeed}
        bad = [flag for flag, hit in refused.items() if hit]
        if bad:
            raise ValueError(f"--sequence_parallel_size {n} does not support: " + "; ".join(bad))

    def _check_preference_flags(self) -> None:
        if self.training_stage not in ("sft", "dpo"):
            raise ValueError(f"--training_stage must be sft or dpo, got {self.training_stage}")
        if self.training_stage == "sft":
            given = [f"--{name} {getattr(self, name)}" for name, default in PREFERENCE_DEFAULTS.items()
                     if getattr(self, name) != default]
            if given:
                raise ValueError(f"{', '.join(given)} apply to preference tuning: add --training_stage dpo (or run "
                                 f"`llava dpo`)")
            return
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"--loss_type must be sigmoid or ipo, got {self.loss_type}")
        if self.beta <= 0 or self.dpo_alpha < 0 or self.gamma < 0:
            raise ValueError(f"--beta must be > 0, --dpo_alpha and --gamma >= 0, got {self.beta}, {self.dpo_alpha}, "
                             f"{self.gamma}")
        if self.packing:
            raise ValueError("--packing is not available with --training_stage dpo (chosen and rejected rows are padded "
                             "into one batch)")

    @cached_property
    def _setup_devices(self):
        """The stock device setup, then (DeepSpeed on CPU only) the rank repair of llava/train/distributed.py."""
        device = super()._setup_devices
        if self.deepspeed and self.distributed_state is not None:
            repair_cpu_process_state(self.distributed_state)
            release_deepspeed_shm()
        return device


PREFERENCE_DEFAULTS = {"beta": 0.1, "dpo_alpha": 1.0, "gamma": 1.0, "loss_type": "sigmoid",
                       "precompute_ref_log_probs": False}
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def check_combinations(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Checks that span two argument groups (each group checks itself in ``__post_init__``)."""
    if training_args.packing and model_args.attn_implementation not in (None, *PACKING_ATTENTION):
        raise ValueError(
            f"--packing keeps attention inside each sample through position ids, which only "
            f"--attn_implementation {', '.join(PACKING_ATTENTION)} read; got {model_args.attn_implementation}"
        )
    if training_args.sequence_parallel_size > 1 and model_args.attn_implementation not in (None, "sdpa"):
        raise ValueError(f"--sequence_parallel_size {training_args.sequence_parallel_size} runs SDPA over the gathered "
                         f"sequence: --attn_implementation must be sdpa, got {model_args.attn_implementation}")
    check_anyres_flags(model_args, data_args)
    check_video_flags(model_args, data_args, training_args)
    tower_flags = [f"--{k} {getattr(training_args, k)}" for k in ("mm_vision_tower_lr", "mm_vision_tower_lr_decay")
                   if getattr(training_args, k) is not None]
    if tower_flags and not (model_args.unfreeze_mm_vision_tower and not model_args.tune_mm_mlp_adapter):
        raise ValueError(f"{' and '.join(tower_flags)} set the vision tower's learning rate, but the tower is frozen: "
                         f"add mm_vision_tower to --mm_tunable_parts (or --unfreeze_mm_vision_tower True)")


def check_inputs(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """The files and directories the flags name exist, the template is known: checked before any model loads."""
    # model/builder.py imports torch: the flags are checked before it loads
    from llava.model.builder import check_model_dirs

    get_template(model_args.version)
    require_model_path("--model_name_or_path", model_args.model_name_or_path,
                       hint="give the directory of an LLM or of a Llava checkpoint")
    if model_args.vision_tower:
        require_model_path("--vision_tower", model_args.vision_tower, hint="give a CLIP or SigLIP directory")
    check_model_dirs(model_args.model_name_or_path, model_args.vision_tower)
    if model_args.pretrain_mm_mlp_adapter:
        require_path("--pretrain_mm_mlp_adapter", model_args.pretrain_mm_mlp_adapter, kind="file",
                     hint="stage 1 writes OUTPUT_DIR/mm_projector.safetensors")
    require_path("--data_path", data_args.data_path, hint="give a LLaVA JSON/JSONL file, Parquet file(s), a "
                 "`datasets` directory or a dataset-mixture YAML")
    if data_args.image_folder:
        require_path("--image_folder", data_args.image_folder, kind="dir",
                     hint="give the directory the records' image paths are relative to")
    if data_args.video_folder:
        require_path("--video_folder", data_args.video_folder, kind="dir",
                     hint="give the directory the records' video paths are relative to")
    if data_args.eval_data_path:
        require_path("--eval_data_path", data_args.eval_data_path, hint="give a LLaVA JSON/JSONL file, Parquet "
                     "file(s), a `datasets` directory or a dataset-mixture YAML")
    for flag in ("--data_path", "--eval_data_path"):  # a mixture's entries: keys, strategies, paths
        path = getattr(data_args, flag[2:])
        if path:
            source_specs(path, data_args.image_folder, data_args.video_folder, flag=flag)
    if Path(training_args.output_dir).is_file():
        raise UsagePathError(f"--output_dir {training_args.output_dir} is a file; give a directory (created if missing)")
    resume = training_args.resume_from_checkpoint
    if resume and resume.lower() not in ("true", "false", "none"):
        hint = "give a checkpoint-N directory of the run, or True for the latest in --output_dir"
        require_path("--resume_from_checkpoint", resume, kind="dir", hint=hint)
        if not any((Path(resume) / name).is_file() for name in CHECKPOINT_FILES):
            raise UsagePathError(f"--resume_from_checkpoint {resume} is no checkpoint (no {' or '.join(CHECKPOINT_FILES)}"
                                 f"); {hint}")


ARG_CLASSES = (ModelArguments, DataArguments, TrainingArguments)
# what a checkpoint-N directory holds: the Trainer's state (hf backend) or llava/megatron/backend/megatron_checkpoint.py's META_FILE
CHECKPOINT_FILES = ("trainer_state.json", "megatron_checkpoint.json")
# Flags of the LLaVA-1.5 launcher scripts that transformers has renamed since: old -> new.
RENAMED_FLAGS = {"--evaluation_strategy": "--eval_strategy"}
ZERO_CONFIGS = Path(__file__).resolve().parents[2] / "zero_configs"


def _bundled_deepspeed_config(value):
    """LLaVA's ``--deepspeed ./scripts/zero2.json`` (absent here) -> this project's ``zero_configs/zero2.json``."""
    if not isinstance(value, str) or os.path.isfile(value) or value.lstrip().startswith("{"):
        return value
    bundled = ZERO_CONFIGS / Path(value).name
    if not bundled.is_file():
        return value
    logger.warning("--deepspeed %s does not exist: using the bundled %s", value, bundled)
    return str(bundled)


def rename_legacy_flags(argv: list[str]) -> list[str]:
    """``--evaluation_strategy no`` -> ``--eval_strategy no`` (also ``--flag=value``), with a one-line notice."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name in RENAMED_FLAGS:
            logger.warning("%s is %s in transformers >= 5: passing it as %s", name, RENAMED_FLAGS[name],
                           RENAMED_FLAGS[name])
            arg = RENAMED_FLAGS[name] + eq + value
        out.append(arg)
    return out


class ArgumentParser(RaiseOnUsageError, transformers.HfArgumentParser):
    """``HfArgumentParser`` whose parse errors raise ``UsageError`` (one line from ``llava train``, exit 2)."""


def build_parser() -> ArgumentParser:
    """The three argument dataclasses + ``--backend`` and the Megatron flags (``llava/megatron/backend/megatron_args.py``)."""
    return ArgumentParser((*ARG_CLASSES, MegatronArguments), prog="llava train",
                          usage="llava train [CONFIG.yaml] [--flag VALUE ...]")


def parse_args(argv: list[str] | None = None, *, with_backend: bool = False) -> tuple:
    """Parse flags, or a YAML/JSON file (first argument) whose keys are the flag names, with flags overriding it.
    Returns (model, data, training) arguments, and the ``MegatronArguments`` fourth when ``with_backend``.

    Every mistake (unknown flag, bad value, bad combination, a missing config file) raises ``UsageError``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        if not os.path.isfile(argv[0]):
            raise UsagePathError(f"config file {argv[0]}: no such file (the first argument names a YAML/JSON file of "
                                 f"flags)")
        argv = _config_file_to_flags(argv[0]) + argv[1:]
    parser = build_parser()
    try:  # __post_init__ checks and transformers' own raise ValueError: all about the flags given
        model_args, data_args, training_args, backend_args, unknown = parser.parse_args_into_dataclasses(
            args=rename_legacy_flags(argv), return_remaining_strings=True)
        if unknown:
            raise UsageValueError(f"unknown flag(s) {' '.join(unknown)}{_did_you_mean(parser, unknown)}")
        check_combinations(model_args, data_args, training_args)
    except ValueError as err:
        if isinstance(err, UsageValueError):
            raise
        raise UsageValueError(one_line(err)) from err
    if with_backend:
        return model_args, data_args, training_args, backend_args
    return model_args, data_args, training_args


def _did_you_mean(parser: ArgumentParser, unknown: list[str]) -> str:
    flags = [s for a in parser._actions for s in a.option_strings]
    close = [m for u in unknown if u.startswith("--") for m in difflib.get_close_matches(u.split("=")[0], flags, 2)]
    return f"; did you mean {', '.join(close)}?" if close else "; `llava train --help` lists the flags"


def _config_file_to_flags(path: str) -> list[str]:
    text = Path(path).read_text()
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text) or {}
    except (ValueError, yaml.YAMLError) as err:
        raise UsageValueError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {one_line(err)}") from err
    if not isinstance(values, dict):
        raise UsageValueError(f"{path}: expected a mapping of flag names to values")
    flags: list[str] = []
    for key, value in values.items():
        if isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        elif value is not None:
            flags += [f"--{key}", str(value)]
    return flags
