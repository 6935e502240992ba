"""The step loop of the Megatron backend: megatron-core's forward-backward schedule, its optimizer, eval, logging.

    history = run_steps(model, optimizer, scheduler, steps, total_steps, training_args, start_step, history,
                        save=..., evaluate=..., log=...)

One optimizer step = one ``get_forward_backward_func()`` call over the step's micro-batches (1F1B or interleaved
when pipelined) + ``optimizer.step()`` (clipping included) + ``scheduler.step(1)``. The loss is the hf backend's:
cross entropy of token t predicting token t+1 over the supervised tokens, summed over the step's micro-batches and
divided by their number (``calculate_per_token_loss``: megatron-core scales the gradients by 1 / tokens, as
transformers does with ``num_items_in_batch``). ``evaluate_loss`` is ``Trainer.evaluate``'s ``eval_loss``: the mean
over eval samples of their batch's per-token loss, batches of ``--per_device_eval_batch_size`` in file order.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from llava.curves import LR_GROUP_PREFIX
from llava.megatron.backend.megatron_model import shift_labels, token_losses
from llava.megatron.backend.packed_thd import packed_params

logger = logging.getLogger("llava.megatron")
STATE_FILE = "megatron_state.json"


def batch_device() -> torch.device:
    """Where batches and collective buffers live: the rank's GPU, else the CPU (GPU runs are untested here)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def make_forward_step(vocab_size: int):
    """megatron-core's ``forward_step_func``: one micro-batch through a model chunk, and its loss function."""

    def forward_step(data_iterator, chunk):
        device = batch_device()
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(data_iterator).items()}
        ids = batch["input_ids"]
        b, s = ids.shape
        if "position_ids" in batch:  # --packing: one THD sequence, attention and rotary positions per sample
            output = chunk(ids, batch["position_ids"], None,
                           packed_seq_params=packed_params(batch["position_ids"], device),
                           pixel_values=batch.get("pixel_values"))
        else:
            position_ids = torch.arange(s, device=device).expand(b, s)
            causal = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=device), diagonal=1)  # True: masked
            output = chunk(ids, position_ids, causal, pixel_values=batch.get("pixel_values"))

        def loss_func(logits):
            losses, mask = token_losses(logits, shift_labels(batch["labels"]), vocab_size)
            total = (losses * mask).sum()
            tokens = mask.sum().to(torch.int)
            return total, tokens, {"loss_sum": total.detach().clone(), "tokens": tokens.clone()}

        return output, loss_func

    return forward_step


def _schedule(model, micro: list[dict], forward_only: bool) -> list[dict]:
    seq, mbs = micro[0]["input_ids"].shape[1], micro[0]["input_ids"].shape[0]
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(model[0].module.vocab_size_real),
        data_iterator=[iter(micro) for _ in model], model=model if len(model) > 1 else model[0],
        num_microbatches=len(micro), seq_length=seq, micro_batch_size=mbs, forward_only=forward_only)


def reduce_sums(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """Sum (numerator, denominator) pairs of the last pipeline stage over data-parallel ranks; known on every
    rank afterwards (broadcast along the pipeline)."""

    sums = torch.zeros(2, dtype=torch.float64, device=batch_device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for num, den in pairs:
            sums[0] += num
            sums[1] += den
        torch.distributed.all_reduce(sums, group=ps.get_data_parallel_group())
    torch.distributed.broadcast(sums, src=ps.get_pipeline_model_parallel_last_rank(),
                                group=ps.get_pipeline_model_parallel_group())
    return float(sums[0]), float(sums[1])


def evaluate_loss(model, eval_batches: list[dict]) -> float:
    """``eval_loss`` as ``transformers.Trainer.evaluate`` computes it (see the module docstring). The batches
    (padded to one shape, see ``StepBatches.eval_batches``) go through the schedule as the micro-batches of one
    forward-only call, so the interleaved schedule gets its minimum of PP micro-batches."""
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        outputs = _schedule(model, eval_batches, forward_only=True)
    for chunk in model:
        chunk.train()
    pairs = []
    for batch, out in zip(eval_batches, outputs):  # outputs: last stage only (empty elsewhere)
        rows = int(batch["num_samples"])
        pairs.append((float(out["loss_sum"]) / max(int(out["tokens"]), 1) * rows, rows))
    num, den = reduce_sums(pairs)
    return num / max(den, 1.0)


def run_steps(model, optimizer, scheduler, steps, total_steps: int, training_args, start_step: int = 0,
              history: list[dict] | None = None, save=None, save_every: int = 0, evaluate=None, eval_every: int = 0,
              log=None, lr_parts: list[str | None] | None = None) -> list[dict]:
    """Train from ``start_step`` to ``total_steps``; ``save(step, history)`` every ``save_every`` steps,
    ``evaluate() -> eval_loss`` every ``eval_every``, ``log(entry)`` for every history entry (wandb).
    ``lr_parts``: what each optimizer group trains (``optimizer_group_parts``), for the per-part learning rates."""
    history = list(history or [])
    out_dir = Path(training_args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for step in range(start_step, total_steps):
        micro = steps.step_batches(step)
        start = time.perf_counter()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses = _schedule(model, micro, forward_only=False)
        lr = optimizer.param_groups[0]["lr"] if optimizer.param_groups else training_args.learning_rate
        part_rates = part_learning_rates(optimizer.param_groups, lr_parts or [])  # the rates this step uses
        updated, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        num, den = reduce_sums([(float(x["loss_sum"]), float(x["tokens"])) for x in losses])
        entry = {"step": step + 1, "loss": num / max(den, 1.0), "grad_norm": grad_norm, "learning_rate": lr,
                 "seconds": time.perf_counter() - start, "updated": bool(updated),
                 "micro_batches": len(micro), "micro_batch_shape": list(micro[0]["input_ids"].shape), **part_rates}
        history.append(entry)
        if torch.distributed.get_rank() == 0 and (step + 1) % max(1, int(training_args.logging_steps)) == 0:
            logger.info("step %d/%d loss %.6f grad_norm %s lr %.3g", step + 1, total_steps, entry["loss"],
                        grad_norm, lr)
        if log is not None:
            log(entry)
        if evaluate is not None and eval_every and (step + 1) % eval_every == 0:
            history.append({"step": step + 1, "eval_loss": evaluate()})
            if log is not None:
                log(history[-1])
        if save is not None and save_every and (step + 1) % save_every == 0:
            save(step + 1, history)
    return history


def optimizer_group_parts(model, optimizer) -> list[str | None]:
    """What each optimizer group trains, by its parameters: "projector", "vision tower", "language model" (the hf
    trainer's names, joined with " + " for a mixed group), "group i" for parameters not found in the model (a bf16
    optimizer's fp32 copies), None for an empty group."""
    owner = {}
    for chunk in model:
        for name, param in chunk.module.named_parameters():
            owner[id(param)] = ("projector" if name.startswith("multi_modal_projector.") else
                                "vision tower" if name.startswith("vision_model.") else "language model")
    parts: list[str | None] = []
    for i, group in enumerate(optimizer.param_groups):
        found = {owner.get(id(p), "?") for p in group["params"]}
        parts.append(None if not found else f"group {i}" if "?" in found else " + ".join(sorted(found)))
    return parts


def part_learning_rates(param_groups: list[dict], parts: list[str | None]) -> dict[str, float]:
    """``{"learning_rate/<part>": rate}``, each part's highest group rate, when the groups' peak rates differ
    (``--mm_projector_lr``), as the hf trainer logs them (``llava/train/trainer.py``); {} when they do not."""
    if len({g.get("max_lr", g["lr"]) for g, part in zip(param_groups, parts) if part}) < 2:
        return {}
    rates: dict[str, float] = {}
    for group, part in zip(param_groups, parts):
        if part:
            key = LR_GROUP_PREFIX + part
            rates[key] = max(float(group["lr"]), rates.get(key, float(group["lr"])))
    return rates


def write_state(output_dir: str, history: list[dict], memory: list[dict] | None) -> None:
    """``megatron_state.json`` (rank 0): the log history, as ``trainer_state.json`` has it, and per-rank memory."""
    if torch.distributed.get_rank() == 0:
        Path(output_dir, STATE_FILE).write_text(json.dumps({"log_history": history, "memory": memory}, indent=2))
