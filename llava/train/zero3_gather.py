"""Gathering weights for saving, ZeRO-3 aware; the only module that imports DeepSpeed.

    state = gather_named_parameters(model.model.multi_modal_projector.named_parameters())   # every rank calls it
    if is_main_process: save_projector_state(state, path)

Under ZeRO-3 a parameter's local tensor is an empty shard (``numel() == 0``); ``GatheredParameters`` materialises
the full tensors on every rank for the duration of the copy. Without DeepSpeed this is a plain CPU copy.
"""

from __future__ import annotations

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
