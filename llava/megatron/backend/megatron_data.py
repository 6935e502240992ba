"""The hf backend's data pipeline for the Megatron backend: same dataset, same sample order, same batches.

    processor, bits = load_processor_bits(hf_dir, model_args)
    dataset = build_dataset(data_args.data_path, model_args, data_args, training_args, processor, bits)
    steps = StepBatches(dataset, pad_id, training_args, dp_size, dp_rank)
    micro_batches = steps.step_batches(step)       # this data-parallel rank's micro-batches of optimizer step `step`

Order (what ``transformers.Trainer`` + accelerate do with the same flags): epoch ``e`` is
``torch.randperm(n, generator=manual_seed(data_seed or seed + e))`` (accelerate's ``SeedableRandomSampler``), or
``LengthGroupedSampler``'s order with ``--group_by_modality_length``; it is cut into batches of
``per_device_train_batch_size``; batch ``k`` belongs to data-parallel rank ``k % dp``; an optimizer step takes
``gradient_accumulation_steps`` batches per rank. Every micro-batch of a step is padded to the same shape (the
pipeline schedules send fixed-shape activations): right padding with ignored labels, which changes no loss term.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoProcessor, LlavaConfig

from llava.constants import IGNORE_INDEX
from llava.data.collator import DataCollatorForSupervisedDataset, DataCollatorWithPacking
from llava.data.dataset import LazySupervisedDataset
from llava.data.samplers import LengthGroupedSampler
from llava.data.templates import get_template
from llava.model.builder import num_image_tokens


def load_processor_bits(hf_dir: str | Path, model_args):
    """The processor of the initial checkpoint and what the dataset needs from the model (no weights)."""
    processor = AutoProcessor.from_pretrained(hf_dir, trust_remote_code=model_args.trust_remote_code)
    processor.tokenizer.padding_side = "right"
    config = LlavaConfig.from_pretrained(hf_dir)
    bits = SimpleNamespace(
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
        image_token_id=config.image_token_id,
        num_image_tokens=num_image_tokens(config.vision_config, config.vision_feature_select_strategy),
        layout=None,  # no anyres here: the Megatron backend refuses --image_aspect_ratio anyres at start-up
        video=None,  # no video here: the Megatron backend refuses --video_folder at start-up
    )
    return processor, bits


def build_dataset(data_path, model_args, data_args, training_args, processor, bits) -> LazySupervisedDataset:
    return LazySupervisedDataset.from_args(data_path, model_args, data_args, training_args, bits,
                                           get_template(model_args.version))


class StepBatches:
    """Micro-batches of each optimizer step for one data-parallel rank (see the module docstring)."""

    def __init__(self, dataset, pad_token_id: int, training_args, dp_size: int = 1, dp_rank: int = 0,
                 pad_multiple: int = 1, min_micro: int = 1):
        self.dataset = dataset
        self.mbs = training_args.per_device_train_batch_size
        self.accum = training_args.gradient_accumulation_steps
        self.seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
        self.grouped = training_args.group_by_modality_length
        self.grouped_seed = training_args.seed  # LLaVATrainer's grouped sampler takes --seed
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.pad_multiple = pad_multiple
        self.min_micro = min_micro
        self.pad_token_id = pad_token_id
        self.collate = DataCollatorForSupervisedDataset(pad_token_id=pad_token_id)
        self.eval_collate = self.collate
        self.packing = training_args.packing
        if self.packing:  # the whole micro-batch in one row: one THD sequence (llava/megatron/backend/packed_thd.py)
            self.collate = DataCollatorWithPacking(pad_token_id=pad_token_id, max_length=None)
        self.rows = 1 if self.packing else self.mbs
        self._orders: dict[int, list[int]] = {}

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if self.grouped:
                sampler = LengthGroupedSampler(self.mbs, self.dp_size * self.accum, self.dataset.modality_lengths,
                                               group_by_modality=True, seed=self.grouped_seed)
                sampler.set_epoch(epoch)
                self._orders[epoch] = sampler.indices()
            else:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._orders[epoch] = torch.randperm(len(self.dataset), generator=generator).tolist()
        return self._orders[epoch]

    @property
    def steps_per_epoch(self) -> int:
        batches = -(-len(self.dataset) // self.mbs)
        return -(-batches // (self.accum * self.dp_size))

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global step (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def step_indices(self, step: int) -> list[list[int]]:
        epoch, k = self.position(step)
        order = self.epoch_order(epoch)
        batches = [order[i : i + self.mbs] for i in range(0, len(order), self.mbs)]
        group = batches[k * self.accum * self.dp_size : (k + 1) * self.accum * self.dp_size]
        return group[self.dp_rank :: self.dp_size]

    def step_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The step's micro-batches, one shape; at least ``min_micro`` of them (an epoch's last step may be short:
        the interleaved schedule needs PP micro-batches, so empty ones -- no supervised token -- fill in)."""
        batches = [self.collate([self.dataset[i] for i in idx]) for idx in self.step_indices(step)]
        if not batches:  # an epoch's tail left this data-parallel rank nothing: one empty micro-batch
            return [self._empty(self.pad_multiple, self.rows) for _ in range(max(1, self.min_micro))]
        width = max(b["input_ids"].shape[1] for b in batches)
        width = -(-width // self.pad_multiple) * self.pad_multiple
        padded = [self._pad(b, width) for b in batches]
        return padded + [self._empty(width, self.rows) for _ in range(self.min_micro - len(padded))]

    def eval_batches(self, dataset, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """This data-parallel rank's eval batches: file order, batch ``k`` to rank ``k % dp`` (what
        ``Trainer.evaluate`` reads), each with ``num_samples`` (its real rows), all padded to one shape and to at
        least ``min_micro`` batches (empty ones: no supervised token, ``num_samples`` 0)."""
        order = list(range(len(dataset)))
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)][self.dp_rank :: self.dp_size]
        batches = [self.eval_collate([dataset[i] for i in idx]) for idx in chunks]
        width = max(b["input_ids"].shape[1] for b in batches)
        width = -(-width // self.pad_multiple) * self.pad_multiple
        out = []
        for idx, batch in zip(chunks, batches):
            out.append({**self._pad(batch, width, rows=batch_size), "num_samples": torch.tensor(len(idx))})
        while len(out) < self.min_micro:
            out.append({**self._empty(width, batch_size), "num_samples": torch.tensor(0)})
        return out

    def _empty(self, width: int, rows: int) -> dict[str, torch.Tensor]:
        empty = {"input_ids": torch.full((rows, width), self.pad_token_id, dtype=torch.long),
                 "labels": torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)}
        if self.packing and rows == self.rows:
            empty["position_ids"] = torch.arange(width).expand(rows, width).clone()
        else:
            empty["attention_mask"] = torch.zeros((rows, width), dtype=torch.long)
        return empty

    def _pad(self, batch: dict[str, torch.Tensor], width: int, rows: int | None = None) -> dict[str, torch.Tensor]:
        target = rows or self.rows
        rows, cols = batch["input_ids"].shape
        if (rows, cols) == (target, width):
            return batch
        out = dict(batch)
        if "position_ids" in batch:  # packed: the tail padding is one more sample of its own (positions from 0)
            out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(width - cols).expand(rows, -1)], 1)
        for key, fill in (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
            if key not in batch:
                continue
            padded = torch.full((target, width), fill, dtype=batch[key].dtype)
            padded[:rows, :cols] = batch[key]
            out[key] = padded
        return out
