"""The private ``transformers`` hooks ``LLaVATrainer`` and ``TrainingArguments`` override or rely on, in one place.

    .venv/bin/pytest tests/train/test_hf_hooks.py      # fails when a signature or a call site below changes

Written against ``TRANSFORMERS_VERSION`` (the pin in ``constraints.txt``). Public hooks (``create_optimizer``,
``save_model``) are not listed. Each entry: the object, its parameters as transformers defines them, the call our
override depends on (a string that must occur in the named function's source, or ``None``), and why we touch it.
When transformers is upgraded and the test fails, re-read the hook's new source, adapt the override in
``llava/train/trainer.py`` / ``llava/train/args.py`` / ``llava/model/builder.py``, then update this table.
"""

from __future__ import annotations

from dataclasses import dataclass

TRANSFORMERS_VERSION = "5.23.0"


@dataclass(frozen=True)
class PrivateHook:
    target: str  # "module:qualname"
    parameters: tuple[str, ...]  # names in order (defaults shown as name=repr(default))
    depends_on: tuple[str, str] | None  # (function "module:qualname", text its source must contain)
    why: str


PRIVATE_HOOKS: tuple[PrivateHook, ...] = (
    PrivateHook("transformers.trainer:Trainer._get_train_sampler", ("self", "train_dataset=None"),
                ("transformers.trainer:Trainer.get_train_dataloader", "sampler_fn=self._get_train_sampler"),
                "LLaVA's modality+length grouped sampler (--group_by_modality_length)"),
    PrivateHook("transformers.trainer:Trainer._save_checkpoint", ("self", "model", "trial"),
                ("transformers.trainer:Trainer._save_checkpoint", "self._get_output_dir("),
                "atomic checkpoints: staged in checkpoint-N.tmp, renamed when complete"),
    PrivateHook("transformers.trainer:Trainer._get_output_dir", ("self", "trial"),
                ("transformers.trainer:Trainer._save_checkpoint", "self._get_output_dir("),
                "returns the staging directory while _save_checkpoint runs"),
    PrivateHook("transformers.trainer:Trainer._save_optimizer_and_scheduler", ("self", "output_dir"),
                ("transformers.trainer:Trainer._save_checkpoint", "self._save_optimizer_and_scheduler("),
                "stage 1 under DeepSpeed: engine checkpoint without the frozen weights"),
    PrivateHook("transformers.trainer:Trainer._prepare_for_training",
                ("self", "max_steps", "train_dataloader", "resume_from_checkpoint"),
                ("transformers.trainer:Trainer._prepare_for_training", "deepspeed_load_checkpoint("),
                "stage-1 DeepSpeed resume: swaps the module-level deepspeed_load_checkpoint for a non-strict load"),
    PrivateHook("transformers.trainer:deepspeed_load_checkpoint",
                ("deepspeed_engine", "checkpoint_path", "load_module_strict=True"), None,
                "the module-level function swapped (and restored) by the _prepare_for_training override"),
    PrivateHook("transformers.trainer:Trainer._load_from_checkpoint", ("self", "resume_from_checkpoint", "model=None"),
                ("transformers.trainer:Trainer.train", "self._load_from_checkpoint("),
                "stage-1 (projector only) and strict full-model resume; LoRA non-LoRA trainables"),
    PrivateHook("transformers.training_args:TrainingArguments._setup_devices", ("self",), None,
                "DeepSpeed on CPU: repair each process's rank (llava/train/distributed.py)"),
    PrivateHook("transformers.integrations.deepspeed:_hf_deepspeed_config_weak_ref", (), None,
                "model/builder.py builds the Llava skeleton outside ZeRO-3's zero.Init (unset, then set back)"),
)
