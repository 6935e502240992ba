"""LLaVADPOTrainer: preference tuning on ``LLaVATrainer`` (sampler, checkpoints, run directory all as for SFT).

    trainer = LLaVADPOTrainer(model=policy, ref_model=frozen_copy_or_None, args=training_args,
                              train_dataset=PreferenceDataset(...), data_collator=DataCollatorForPreference(pad_id),
                              processing_class=processor, run_args=...)

Each step runs the policy once on the batch's ``2n`` rows (``llava/model/preference_forward.py``: chosen and
rejected in one forward, each pair's images encoded once, summed answer log-probs from the LM head on answer positions
only) and takes the reference log-probs from one of three places, decided once:

- ``ref_model``: a frozen copy of the starting model (full fine-tuning), run under ``no_grad``;
- ``ref_model=None`` with a PEFT policy: the same model with its adapters disabled (no second copy);
- ``--precompute_ref_log_probs``: :meth:`precompute_reference_logps` runs the starting model over the whole dataset
  at the first step, before the first update, and stores each pair's two log-probs in ``ref_logps.safetensors`` in the run directory; training
  looks them up by ``pair_index`` and holds no reference model. A resumed run reads the file instead of recomputing.

The loss and the metrics are ``llava/train/dpo_loss.py``'s; the metrics (TRL's names) are averaged over the logging
interval and over ranks and logged with the loss.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from llava.model.preference_forward import answer_logps
from llava.run_dir import REF_LOGPS_FILE
from llava.safetensors_io import atomic_save_safetensors
from llava.train.dpo_loss import dpo_objective
from llava.train.trainer import LLaVATrainer

logger = logging.getLogger(__name__)


class LLaVADPOTrainer(LLaVATrainer):
    def __init__(self, *args, ref_model: torch.nn.Module | None = None, precompute_reference: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        # the loss is a mean over the micro-batch's pairs, not a sum over its label tokens: the Trainer must divide it
        # by the accumulation steps itself (and not rescale it by token counts across devices), as for TRL's DPO
        self.model_accepts_loss_kwargs = False
        self.ref_model = ref_model
        self.ref_table: torch.Tensor | None = None  # [pairs, 2] (chosen, rejected) when precomputed
        self._dpo_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._ref_prepared = False
        if precompute_reference and os.path.isfile(self.ref_logps_path):  # a resumed run: read, never recomputed
            self.ref_table = self._read_ref_table()
        self._precompute_pending = precompute_reference and self.ref_table is None

    @property
    def ref_logps_path(self) -> str:
        return os.path.join(self.args.output_dir, REF_LOGPS_FILE)

    def _prepare_reference(self, model) -> None:
        """Once, at the first step (the policy is wrapped by then, and under DeepSpeed its config is final): the
        precomputed table, or the frozen copy as a DeepSpeed inference engine sharded as the policy is."""
        self._ref_prepared = True
        if self._precompute_pending:
            self.precompute_reference_logps(model)
        if self.ref_model is not None and self.is_deepspeed_enabled:
            from llava.train.zero3_gather import deepspeed_reference_engine  # imports DeepSpeed: only under it

            self.ref_model = deepspeed_reference_engine(self.ref_model,
                                                        self.accelerator.state.deepspeed_plugin.deepspeed_config)

    # ---------------------------------------------------------------- the reference
    @contextlib.contextmanager
    def _reference_mode(self):
        """The starting model: a PEFT policy with its adapters off (eval mode, no grad), or nothing to change."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            with torch.no_grad(), (unwrapped.disable_adapter() if hasattr(unwrapped, "disable_adapter")
                                   else contextlib.nullcontext()):
                yield
        finally:
            unwrapped.train(was_training)

    def reference_logps(self, model, inputs: dict) -> torch.Tensor:
        """``[2n]`` summed answer log-probs of the reference, chosen rows first."""
        if self.ref_table is not None:
            pairs = self.ref_table[inputs["pair_index"].cpu()]
            return torch.cat([pairs[:, 0], pairs[:, 1]])
        if self.ref_model is not None:
            with torch.no_grad():
                return answer_logps(self.ref_model, inputs)[0]
        with self._reference_mode():
            return answer_logps(model, inputs)[0]

    def _read_ref_table(self) -> torch.Tensor:
        table, n = load_file(self.ref_logps_path)["ref_logps"], len(self.train_dataset)
        if table.shape != (n, 2):
            raise ValueError(f"{self.ref_logps_path} holds reference log-probs of {table.shape[0]} pairs, the dataset "
                             f"has {n}: remove it (or give another --output_dir) to compute them again")
        logger.info("reference log-probs read from %s", self.ref_logps_path)
        return table

    def precompute_reference_logps(self, model) -> torch.Tensor:
        """Every pair's reference log-probs from the starting model (``model``: the policy before its first update),
        in dataset order with every rank running the same batches (ZeRO-3 gathers in step), written to
        ``ref_logps.safetensors`` by the main process."""
        self._precompute_pending = False
        n = len(self.train_dataset)
        loader = DataLoader(self.train_dataset, batch_size=self.args.per_device_eval_batch_size,
                            collate_fn=self.data_collator, shuffle=False)
        table = torch.zeros(n, 2, dtype=torch.float32)
        with self._reference_mode():
            for batch in tqdm(loader, desc="reference log-probs", disable=not self.is_local_process_zero()):
                batch = self._prepare_inputs(batch)
                sums = answer_logps(model, batch)[0].float().cpu()
                idx = batch["pair_index"].cpu()
                table[idx, 0], table[idx, 1] = sums.chunk(2)
        if self.args.should_save:
            atomic_save_safetensors({"ref_logps": table}, self.ref_logps_path)
        self.accelerator.wait_for_everyone()
        self.ref_table = table
        return table

    # ---------------------------------------------------------------- the loss and its metrics
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The DPO objective of one batch (``num_items_in_batch`` unused: the loss is a mean over pairs)."""
        if not self._ref_prepared:
            self._prepare_reference(model)
        policy_sums, counts = answer_logps(model, inputs)
        ref_sums = self.reference_logps(model, inputs)
        args = self.args
        loss, metrics = dpo_objective(policy_sums, counts, ref_sums, beta=args.beta, dpo_alpha=args.dpo_alpha,
                                      gamma=args.gamma, loss_type=args.loss_type)
        for key, value in metrics.items():
            self._dpo_metrics[key].append(value.detach().float().cpu())
        return (loss, {"policy_logps": policy_sums}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the preference metrics (TRL's names), averaged since the last log and over ranks, to a train log."""
        if "loss" in logs and self._dpo_metrics:
            keys = sorted(self._dpo_metrics)
            means = torch.stack([torch.stack(self._dpo_metrics[k]).mean() for k in keys])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                means = means.to(self.args.device)
                torch.distributed.all_reduce(means)
                means = means.cpu() / torch.distributed.get_world_size()
            logs.update({k: float(v) for k, v in zip(keys, means)})
            self._dpo_metrics.clear()
        super().log(logs, start_time)
