"""Gathering weights for saving, ZeRO-3 aware, and DPO's reference engine; the only module that imports DeepSpeed.

    state = gather_named_parameters(model.model.multi_modal_projector.named_parameters())   # every rank calls it
    if is_main_process: save_projector_state(state, path)

Under ZeRO-3 a parameter's local tensor is an empty shard (``numel() == 0``); ``GatheredParameters`` materialises
the full tensors on every rank for the duration of the copy. Without DeepSpeed this is a plain CPU copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch


def is_zero3_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def gather_named_parameters(named: Iterable[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Full CPU copies of (possibly ZeRO-3-partitioned) parameters. Collective: every rank must call it."""
    named = list(named)
    partitioned = [p for _, p in named if is_zero3_partitioned(p)]
    if not partitioned:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}
    # deepspeed only when parameters are ZeRO-3 partitioned
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def deepspeed_reference_engine(model: torch.nn.Module, ds_config: dict):
    """DPO's frozen reference under DeepSpeed, placed and sharded as the policy is: an inference engine (no optimizer)
    from the run's finalized config; ZeRO-3 partitions its parameters like the policy's, ZeRO-0/1/2 keep it whole
    (those stages shard optimizer state, which a reference has none of). Every rank calls it."""
    import deepspeed  # imported when used (ZeRO-3 runs), as above

    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
