"""LLaVADPOTrainer: preference tuning on ``LLaVATrainer`` (sampler, checkpoints, run directory all as for SFT).

    trainer = LLaVADPOTrainer(model=policy, ref_model=frozen_copy_or_None, args=training_args,
                              train_dataset=PreferenceDataset(...), data_collator=DataCollatorForPreference(pad_id),
                              processing_class=processor, run_args=...)

Each step runs the policy once on the batch's ``2n`` rows (``llava/model/preference_forward.py``: chosen and
rejected in one forward, each pair's images encoded once, summed answer log-probs from the LM head on answer positions
only) and takes the reference log-probs from one of three places, decided once:

- ``ref_model``: a frozen copy of the starting model (full fine-tuning), run under ``no_grad``;
- ``ref_model=None`` with a PEFT policy: the same model with its adapters disabled (no second copy);
- ``--precompute_ref_log_probs``: :meth:`precompute_reference_logps` ran the starting model over the whole dataset
  before training and stored each pair's two log-probs in ``ref_logps.safetensors`` in the run directory; training
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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from llava.model.preference_forward import answer_logps
from llava.run_dir import REF_LOGPS_FILE, atomic_save_safetensors
from llava.train.dpo_loss import dpo_objective
from llava.train.trainer import LLaVATrainer

logger = logging.getLogger(__name__)


class LLaVADPOTrainer(LLaVATrainer):
    def __init__(self, *args, ref_model: torch.nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ref_model = ref_model
        self.ref_table: torch.Tensor | None = None  # [pairs, 2] (chosen, rejected) when precomputed
        self._dpo_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)

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

    def precompute_reference_logps(self, path: str | None = None) -> torch.Tensor:
        """Every pair's reference log-probs, from ``ref_logps.safetensors`` when the run directory has it (resume),
        else computed with the starting model (in dataset order, every rank the same batches: ZeRO-3 gathers in
        step) and written there by the main process."""
        from safetensors.torch import load_file

        path = path or os.path.join(self.args.output_dir, REF_LOGPS_FILE)
        n = len(self.train_dataset)
        if os.path.isfile(path):
            table = load_file(path)["ref_logps"]
            if table.shape != (n, 2):
                raise ValueError(f"{path} holds reference log-probs of {table.shape[0]} pairs, the dataset has {n}: "
                                 f"remove it (or give another --output_dir) to compute them again")
            logger.info("reference log-probs read from %s", path)
            self.ref_table = table
            return table
        model = self._wrap_model(self.model, training=False) if not self.is_deepspeed_enabled else self.model
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
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            atomic_save_safetensors({"ref_logps": table}, path)
        self.accelerator.wait_for_everyone()
        self.ref_table = table
        return table

    # ---------------------------------------------------------------- the loss and its metrics
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The DPO objective of one batch (``num_items_in_batch`` unused: the loss is a mean over pairs)."""
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
            logs.update({k: round(float(v), 6) for k, v in zip(keys, means)})
            self._dpo_metrics.clear()
        super().log(logs, start_time)
