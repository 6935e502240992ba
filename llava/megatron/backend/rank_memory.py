"""What one rank of a Megatron run holds: weights, gradient buffers and optimizer state, counted from the tensors.

    report = rank_memory(model, optimizer)     # {"lm_weights_mib", "vision_weights_mib", "grad_buffers_mib",
                                               #  "optimizer_state_mib", "peak_rss_mib"}

The counts are the bytes of the actual tensors on this rank (parameters split by part, megatron-core DDP's
gradient buffers, every tensor in the optimizer's state), so they do not depend on the allocator or on what else
the process imported; ``peak_rss_mib`` is the process's peak resident memory (Linux ``VmHWM``), which does. Written
per rank into ``megatron_state.json`` (``memory``) at the end of a run; ``scripts/megatron_memory.py`` compares
TP1 with TP2.
"""

from __future__ import annotations

from pathlib import Path

import torch

MIB = 2**20


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return -1.0


def _optimizer_tensors(optimizer):
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if torch_opt is None:
            continue
        for state in torch_opt.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def rank_memory(model: list, optimizer) -> dict[str, float]:
    """Per-rank bytes (MiB) of language-model weights, vision tower + projector weights, gradient buffers and
    optimizer state, and the peak RSS."""
    lm, vision, grads = [], [], []
    for ddp in model:
        for name, param in ddp.module.named_parameters():
            (vision if name.startswith(("vision_model.", "multi_modal_projector.")) else lm).append(param)
        for buffer in getattr(ddp, "buffers", []):
            grads.append(buffer.grad_data)
    return {
        "lm_weights_mib": _nbytes(lm) / MIB,
        "vision_weights_mib": _nbytes(vision) / MIB,
        "grad_buffers_mib": _nbytes(grads) / MIB,
        "optimizer_state_mib": _nbytes(_optimizer_tensors(optimizer)) / MIB,
        "peak_rss_mib": _peak_rss_mib(),
    }


def gather_memory(model: list, optimizer) -> list[dict] | None:
    """Every rank's ``rank_memory`` on rank 0 (None elsewhere)."""
    report = {"rank": torch.distributed.get_rank(), **rank_memory(model, optimizer)}
    gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(report, gathered, dst=0)
    return gathered
