"""How the model is built: ``ModelArguments``, the original LLaVA's model flags (parsed by ``llava.train.args``).

    ModelArguments(model_name_or_path="LLM_DIR", vision_tower="CLIP_DIR", version="vicuna_v1")
    model_args_from_run(read_run_args("out/lora"))          # llava/run_dir.py: rebuilt from a run directory

Training parses it with the data and training arguments; export and serve rebuild it from ``llava_args.json``
through ``llava.run_dir.model_args_from_run``. Bad values fail in ``__post_init__`` with the flag name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_PROJECTORS = ("mlp2x_gelu",)
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
TUNABLE_PARTS = ("mm_vision_tower", "mm_mlp_adapter", "mm_language_model")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "LLM directory (Llama/Qwen2/Mistral...) or a Llava checkpoint"})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP or SigLIP directory (full or vision-only)"})
    version: str = field(default="vicuna_v1", metadata={"help": "conversation template: plain, vicuna_v1 (v1), "
                                                                "llava_v1, llama_2, llava_llama_2, mistral_instruct, "
                                                                "mistral, chatml (qwen_2, qwen_1_5), llama3, llava_llama_3, auto"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the language model"})
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "freeze the projector"})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={"help": "train the vision tower too"})
    pretrain_mm_mlp_adapter: str | None = field(
        default=None, metadata={"help": "stage-1 projector: our mm_projector.safetensors or LLaVA's mm_projector.bin"}
    )
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "only mlp2x_gelu maps to transformers Llava"})
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "vision hidden layer fed to the projector"})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "patch (drop CLS) or cls_patch"})
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "wrap each image in <im_start> <im_end>"})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "accepted for LLaVA scripts; must be False"})
    mm_patch_merge_type: str = field(default="flat", metadata={
        "help": "flat (one view per image: pad/square) or spatial_unpad (anyres: unpadded grid + image_newline, what "
                "the native LlavaNext/LlavaOnevision compute); spatial is LLaVA-NeXT's but has no native class"})
    mm_newline_position: str = field(default="grid", metadata={
        "help": "LLaVA-NeXT's flag: grid (one image_newline per feature row of the anyres grid); the others place "
                "newlines between video frames (not supported)"})
    mm_tunable_parts: str | None = field(default=None, metadata={
        "help": "LLaVA-NeXT's flag, comma-separated: mm_vision_tower, mm_mlp_adapter (+ image_newline), "
                "mm_language_model; replaces the tune/freeze flags (mm_mlp_adapter alone = stage 1)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom code in model directories"})
    attn_implementation: str | None = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2"})

    def __post_init__(self):
        if self.mm_projector_type not in SUPPORTED_PROJECTORS:
            raise ValueError(
                f"--mm_projector_type {self.mm_projector_type} cannot be represented by transformers' "
                f"LlavaForConditionalGeneration (a fixed 2-layer GELU MLP); use one of {SUPPORTED_PROJECTORS}"
            )
        if self.mm_vision_select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"--mm_vision_select_feature must be patch or cls_patch, got {self.mm_vision_select_feature}")
        if self.mm_use_im_patch_token:
            raise ValueError("--mm_use_im_patch_token True is not supported (LLaVA-1.5 scripts pass False)")
        if self.mm_patch_merge_type not in MERGE_TYPES:
            raise ValueError(f"--mm_patch_merge_type {self.mm_patch_merge_type!r}: expected one of {', '.join(MERGE_TYPES)}")
        if self.mm_newline_position != "grid":
            raise ValueError(f"--mm_newline_position {self.mm_newline_position!r}: only grid applies to images (one "
                             f"image_newline per feature row); one_token/frame/no_token place newlines in videos")
        if self.mm_tunable_parts is not None:
            self._apply_tunable_parts()
        if self.tune_mm_mlp_adapter and self.freeze_mm_mlp_adapter:
            raise ValueError("--tune_mm_mlp_adapter and --freeze_mm_mlp_adapter together leave nothing to train")

    def _apply_tunable_parts(self) -> None:
        """``--mm_tunable_parts`` as the tune/freeze flags apply_freezing reads (one freezing policy)."""
        parts = {p.strip() for p in self.mm_tunable_parts.split(",") if p.strip()}
        unknown = parts - set(TUNABLE_PARTS)
        if unknown or not parts:
            raise ValueError(f"--mm_tunable_parts {self.mm_tunable_parts!r}: expected a comma-separated subset of "
                             f"{', '.join(TUNABLE_PARTS)}" + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
        if parts == {"mm_mlp_adapter"}:  # stage 1: projector-only checkpoints, as --tune_mm_mlp_adapter
            implied = {"tune_mm_mlp_adapter": True, "freeze_backbone": False, "freeze_mm_mlp_adapter": False,
                       "unfreeze_mm_vision_tower": False}
        else:
            implied = {"tune_mm_mlp_adapter": False, "freeze_backbone": "mm_language_model" not in parts,
                       "freeze_mm_mlp_adapter": "mm_mlp_adapter" not in parts,
                       "unfreeze_mm_vision_tower": "mm_vision_tower" in parts}
        clash = [f"--{k}" for k, v in implied.items() if getattr(self, k) and not v]
        if clash:
            raise ValueError(f"--mm_tunable_parts {self.mm_tunable_parts!r} decides what trains; it contradicts "
                             f"{', '.join(clash)}: drop them")
        for key, value in implied.items():
            setattr(self, key, value)
