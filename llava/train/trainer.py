"""LLaVATrainer: ``transformers.Trainer`` with LLaVA's grouped sampler, projector LR, and stage-1 checkpoints.

    trainer = LLaVATrainer(model=..., args=training_args, train_dataset=ds, data_collator=collate,
                           processing_class=processor, projector_only=model_args.tune_mm_mlp_adapter,
                           run_args=resolved_args_dict(...))

Stage 1 (``projector_only``) checkpoints hold ``mm_projector.safetensors`` instead of the frozen model, plus the
optimizer, scheduler, RNG and trainer state, so they resume (under DeepSpeed the engine checkpoint excludes the
frozen weights too, and is loaded back non-strictly, then checked against the projector file); every checkpoint and
the final output carry ``llava_args.json``. Checkpoints are staged in ``checkpoint-N.tmp`` and renamed when complete.
What a run directory holds is ``llava/run_dir.py``; the private ``transformers.Trainer`` hooks overridden here are
listed, with the transformers version, in ``llava/train/hf_hooks.py`` (``tests/train/test_hf_hooks.py`` checks them).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from functools import partial
from typing import Any

import torch
import transformers.trainer as hf_trainer
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DeepSpeedSchedulerWrapper
from torch.utils.data import DataLoader
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Trainer,
)
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints, seed_worker

from llava.curves import LR_GROUP_PREFIX, CurvesWriter
from llava.data.samplers import LengthGroupedSampler
from llava.model.projector import load_projector_state, read_projector_file, save_projector_state
from llava.model.sequence_parallel import data_parallel_rank_and_size
from llava.run_dir import (
    BAD_SAMPLES_FILE,
    NON_LORA_FILE,
    PROJECTOR_FILE,
    atomic_write_text,
    fsync_dir,
    load_non_lora_trainables,
    training_run_kind,
    write_run_args,
)
from llava.train.lora import save_lora_checkpoint
from llava.train.param_groups import (
    deepspeed_optimizer_keeps_groups,
    is_projector_param,
    needs_param_groups,
    optimizer_param_groups,
)
from llava.train.zero3_gather import gather_named_parameters

logger = logging.getLogger(__name__)
LLAVA_MODEL_CLASSES = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                       LlavaOnevisionForConditionalGeneration, LlavaNextVideoForConditionalGeneration)


class LLaVATrainer(Trainer):
    def __init__(self, *args, projector_only: bool = False, run_args: dict[str, Any] | None = None, **kwargs):
        self.projector_only = projector_only
        self.run_args = run_args or {}
        self._curves = CurvesWriter(logger)  # curves.png at each save; without matplotlib, said once
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        """LLaVA's modality+length grouping: one megabatch is one optimizer step over all ranks."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(dataset)
        return LengthGroupedSampler(
            self.args.per_device_train_batch_size,
            self._data_parallel()[1] * self.args.gradient_accumulation_steps,
            # arrays where the dataset has them (millions of samples: no Python list of every length)
            dataset.modality_length_array if hasattr(dataset, "modality_length_array") else dataset.modality_lengths,
            group_by_modality=True,
            seed=self.args.seed,
            modalities=(dataset.modality_array if hasattr(dataset, "modality_array")  # video runs: video a modality
                        else getattr(dataset, "modalities", None)),
        )

    def _data_parallel(self) -> tuple[int, int]:
        """(data-parallel rank, data-parallel size): the ranks of one --sequence_parallel_size group share a batch."""
        n = getattr(self.args, "sequence_parallel_size", 1)
        if n <= 1:
            return self.args.process_index, self.args.world_size
        return data_parallel_rank_and_size(n)

    def get_train_dataloader(self):
        """Under sequence parallelism the batches are dealt per data-parallel rank (every rank of a group gets the
        same ones): the stock loader's ``DataLoader`` (transformers' ``Trainer._get_dataloader``, training path),
        sharded by accelerate's ``prepare_data_loader`` with the data-parallel rank and size instead of the
        process's, and its other settings as ``Accelerator.prepare_data_loader`` passes them (seedable sampler,
        RNG types), so resume skips batches as without sequence parallelism."""
        if getattr(self.args, "sequence_parallel_size", 1) <= 1:
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        args, acc = self.args, self.accelerator
        loader = DataLoader(  # the collator as is: --remove_unused_columns is refused (args.py)
            self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            prefetch_factor=args.dataloader_prefetch_factor, in_order=args.dataloader_in_order,
            sampler=self._get_train_sampler(self.train_dataset), drop_last=args.dataloader_drop_last,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index))
        rank, size = self._data_parallel()
        prepared = prepare_data_loader(
            loader, acc.device, num_processes=size, process_index=rank, split_batches=acc.split_batches,
            put_on_device=acc.device_placement, rng_types=acc.rng_types.copy(), dispatch_batches=acc.dispatch_batches,
            even_batches=acc.even_batches, use_seedable_sampler=acc.use_seedable_sampler,
            data_seed=acc.dataloader_config.data_seed, non_blocking=acc.non_blocking,
            use_stateful_dataloader=acc.use_stateful_dataloader)
        acc._dataloaders.append(prepared)  # as Accelerator.prepare_data_loader records it
        return prepared

    def create_optimizer(self, model=None):
        """Projector / vision-tower learning rates and tower layer decay as parameter groups (param_groups.py)."""
        if not needs_param_groups(self.args) or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(self._param_groups(opt_model), **optimizer_kwargs)
        return self.optimizer

    def _param_groups(self, model=None) -> list[dict]:
        model = self.model if model is None else model
        return optimizer_param_groups(model, self.args, self.get_decay_parameter_names(model))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Stage 1 saves the projector only (gathered under ZeRO-3); every save writes the run's arguments."""
        output_dir = output_dir or self.args.output_dir
        if self.projector_only:
            model = self.accelerator.unwrap_model(self.model)
            named = list(model.model.multi_modal_projector.named_parameters())
            if getattr(model.model, "image_newline", None) is not None:  # anyres: saved beside the projector
                named.append(("image_newline", model.model.image_newline))
            embed = model.get_input_embeddings().weight
            if embed.requires_grad:
                named.append(("embed_tokens.weight", embed))
            state = gather_named_parameters(named)
            if self.args.should_save:
                save_projector_state(state, os.path.join(output_dir, PROJECTOR_FILE))
        elif hasattr(self.accelerator.unwrap_model(self.model), "peft_config"):  # LoRA: adapter + non-LoRA trainables
            save_lora_checkpoint(self.accelerator.unwrap_model(self.model), output_dir, should_save=self.args.should_save)
            if self.args.should_save and self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        else:
            super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            kind = training_run_kind(projector_only=self.projector_only, lora_enable=getattr(self.args, "lora_enable", False),
                                     bits=getattr(self.args, "bits", 16))
            write_run_args(output_dir, self.run_args, {"projector_only": self.projector_only, "run_kind": kind.value})
            self._write_bad_samples(output_dir)
            self._curves(output_dir, self.state.log_history)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """With parameter groups at their own learning rates (projector, vision tower), each part's rate too: the
        highest of its groups (a tower under layer decay has a group per layer, all on the same schedule)."""
        groups = getattr(self.optimizer, "param_groups", None) or []
        if "learning_rate" in logs and self.lr_scheduler is not None and len(groups) > 1:
            if len({g.get("initial_lr", g.get("lr")) for g in groups}) > 1:
                rates = self.lr_scheduler.get_last_lr()
                per_part: dict[str, float] = {}
                for name, rate in zip(self._lr_group_names(len(rates)), rates):
                    per_part[name] = max(rate, per_part.get(name, rate))
                for name, rate in per_part.items():
                    logs.setdefault(LR_GROUP_PREFIX + name, rate)
        super().log(logs, start_time)

    def _lr_group_names(self, n: int) -> list[str]:
        """What each optimizer group trains (projector / vision tower / language model), by its parameters (under ZeRO,
        the parameters DeepSpeed keeps per group); "group i" where they are not the model's."""
        cached = getattr(self, "_lr_names", None)
        if cached is not None and len(cached) == n:
            return cached
        model = self.accelerator.unwrap_model(self.model)
        owner = {id(p): ("projector" if is_projector_param(name) else "vision tower" if "vision_tower" in name
                         else "language model") for name, p in model.named_parameters()}
        params = [g["params"] for g in getattr(self.optimizer, "param_groups", [])]
        zero = getattr(self.optimizer, "optimizer", None)  # DeepSpeed ZeRO keeps each group's own parameters here
        originals = getattr(zero, "bit16_groups", None) or getattr(zero, "fp16_groups", None)
        if originals is not None and len(originals) == n:
            params = originals
        names = []
        for i in range(n):
            parts = sorted({owner.get(id(p), "?") for p in (params[i] if i < len(params) else [])})
            names.append(" + ".join(parts) if parts and "?" not in parts else f"group {i}")
        self._lr_names = names
        return names

    def _write_bad_samples(self, output_dir: str) -> None:
        """Counts of skipped samples by kind (``bad_samples.json``), so a run says what it did not train on."""
        report = getattr(self.train_dataset, "bad_samples_report", None)
        if report is None:
            return
        report = report()
        failed = report["failed_during_training"]["counts"]
        if failed:
            logger.warning("samples replaced after their image failed during training: %s", failed)
        atomic_write_text(os.path.join(output_dir, BAD_SAMPLES_FILE), json.dumps(report, indent=2))

    def _save_checkpoint(self, model, trial) -> None:
        """Atomic: everything is written into ``checkpoint-N.tmp/`` and renamed to ``checkpoint-N`` when complete, so
        a kill mid-save leaves the previous checkpoint as the latest (resume ignores names that are not
        ``checkpoint-<digits>``)."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"{name}.tmp")
        if self.args.should_save and os.path.isdir(staging):  # left by a run killed mid-save
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            os.rmdir(staging)
            fsync_dir(run_dir)
            if self.state.best_model_checkpoint == os.path.join(staging, name):
                self.state.best_model_checkpoint = final

            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Stage 1 under DeepSpeed: the engine checkpoint without the frozen model (rebuilt from its inputs)."""
        if not (self.is_deepspeed_enabled and self.projector_only):
            return super()._save_optimizer_and_scheduler(output_dir)
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _get_output_dir(self, trial) -> str:
        """Inside ``_save_checkpoint`` the run directory is the staging directory (see above)."""
        staging = getattr(self, "_staging_dir", None)
        return staging if staging else super()._get_output_dir(trial=trial)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Stage 1 under DeepSpeed: the engine checkpoint holds no frozen weights, so its module state is loaded
        non-strictly, and the projector it restored is checked against the checkpoint's mm_projector.safetensors."""
        if self.is_deepspeed_enabled and needs_param_groups(self.args) and not getattr(self, "_keeping_groups", False):
            self._keeping_groups = True  # a DeepSpeed "optimizer" block gets our groups, not a flat list
            try:
                with deepspeed_optimizer_keeps_groups(self._param_groups):
                    return self._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
            finally:
                self._keeping_groups = False
        if not (self.is_deepspeed_enabled and self.projector_only and resume_from_checkpoint):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)

        strict_load = hf_trainer.deepspeed_load_checkpoint

        def load_projector_only(engine, path, load_module_strict=True):
            strict_load(engine, path, load_module_strict=False)
            self._check_projector_restored(path)

        hf_trainer.deepspeed_load_checkpoint = load_projector_only
        try:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        finally:
            hf_trainer.deepspeed_load_checkpoint = strict_load

    def _check_projector_restored(self, checkpoint: str) -> None:
        saved = read_projector_file(os.path.join(checkpoint, PROJECTOR_FILE))
        model = self.accelerator.unwrap_model(self.model)
        named = list(model.model.multi_modal_projector.named_parameters())
        if getattr(model.model, "image_newline", None) is not None:
            named.append(("image_newline", model.model.image_newline))
        restored = gather_named_parameters(named)
        for name, tensor in restored.items():
            if not torch.equal(tensor, saved[name].to(tensor.dtype)):
                raise RuntimeError(f"{checkpoint}: the DeepSpeed engine state did not restore projector weight {name} "
                                   f"(differs from {PROJECTOR_FILE})")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Stage 1 holds only the projector (the frozen rest was rebuilt from the original weights). A full Llava
        checkpoint is saved in transformers' legacy key layout, which the stock non-strict ``load_state_dict``
        silently skips; ``from_pretrained`` maps the keys, then a strict copy proves every weight arrived."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.projector_only:
            load_projector_state(model, os.path.join(resume_from_checkpoint, PROJECTOR_FILE))
        elif isinstance(model, LLAVA_MODEL_CLASSES):
            reloaded = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
            model.load_state_dict(reloaded.state_dict(), strict=True)
            del reloaded
        else:  # a PEFT-wrapped model: the stock adapter loading path, then the projector / new embeddings
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if os.path.isfile(os.path.join(resume_from_checkpoint, NON_LORA_FILE)):
                load_non_lora_trainables(model.get_base_model(), os.path.join(resume_from_checkpoint, NON_LORA_FILE))

