"""Checkpoints of a Megatron run: every rank's shards + optimizer state + RNG, the scheduler and the data position.

    save_checkpoint(run_dir, step, model, optimizer, scheduler, history, layout, padded, divisor, hf_dir)
    path = resolve_resume(run_dir, "True" | "path/to/checkpoint-N" | None)
    step, history = load_checkpoint(path, model, optimizer, scheduler, layout)

Layout (``--save_steps`` N, under ``OUTPUT_DIR``)::

    checkpoint-N/megatron_checkpoint.json      step, log history, scheduler state, TP/PP/VPP/DP
    checkpoint-N/mca_config.json, hf_files/    so ``llava convert mcore2hf checkpoint-N out`` exports it
    checkpoint-N/mp_rank_XX_YYY/model_chunk_V.safetensors   the rank's weights (MCA local keys)
    checkpoint-N/mp_rank_XX_YYY/optimizer.pt   the rank's optimizer state (data-parallel rank 0 writes it)
    checkpoint-N/rng/rank_R.pt                 every rank's CPU RNG and model-parallel RNG tracker states
    checkpoint-N/curves.png, curves.json       the training curves so far (``on_staged``; with matplotlib)

The data position is the step: the sample order is a pure function of the seed and the epoch
(``llava.megatron.backend.megatron_data``), so step N+1 reads the same batches resumed or not. Every file is written into
``checkpoint-N.tmp/``, renamed to ``checkpoint-N`` by rank 0 once all ranks are done (after a barrier): a kill
mid-save leaves the previous checkpoint as the latest complete one. Optimizer files are read with
``weights_only=True``. Resuming needs the same TP/PP/VPP (the optimizer state is per shard).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from llava.errors import UsagePathError, UsageValueError
from llava.megatron.backend.rank_weights import load_rank_state, write_mca_meta, write_rank_shards
from llava.megatron.converter.mcore_convert import chunk_file, rank_dir
from llava.run_dir import fsync_dir

META_FILE = "megatron_checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _ranks():
    # megatron-core (the [megatron] extra), imported only when the backend runs
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(),
            ps.get_data_parallel_world_size())


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, history: list[dict], layout,
                    padded: int, divisor: int, hf_dir: Path, save_total_limit: int | None = None,
                    on_staged=None) -> Path:
    """Write ``run_dir/checkpoint-{step}`` (all ranks call this); see the module docstring. ``on_staged(staging)``:
    rank 0 adds its files (the curves) to the staged checkpoint before the rename."""
    # megatron-core (the [megatron] extra), imported only when the backend runs
    from megatron.core import tensor_parallel

    run_dir = Path(run_dir)
    final, staging = run_dir / f"checkpoint-{step}", run_dir / f"checkpoint-{step}.tmp"
    rank = torch.distributed.get_rank()
    if rank == 0 and staging.exists():  # left by a run killed mid-save
        shutil.rmtree(staging)
    torch.distributed.barrier()
    tp_rank, pp_rank, dp_rank, dp_size = _ranks()
    write_rank_shards(staging, [m.module for m in model], layout, tp_rank, pp_rank, write=dp_rank == 0)
    if dp_rank == 0:
        (staging / rank_dir(tp_rank, pp_rank)).mkdir(parents=True, exist_ok=True)
        torch.save(optimizer.state_dict(), staging / rank_dir(tp_rank, pp_rank) / "optimizer.pt")
    (staging / "rng").mkdir(parents=True, exist_ok=True)
    torch.save({"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()},
               staging / "rng" / f"rank_{rank}.pt")
    torch.distributed.barrier()
    if rank == 0:
        write_mca_meta(staging, hf_dir, layout, padded, divisor)
        meta = {"step": step, "log_history": history, "scheduler": scheduler.state_dict(),
                "parallel": {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "dp": dp_size}}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if on_staged is not None:
            on_staged(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(run_dir)
        _rotate(run_dir, save_total_limit)
    torch.distributed.barrier()
    return final


def resolve_resume(run_dir: str | Path, value: str | None) -> Path | None:
    """``--resume_from_checkpoint``: None/False -> None; True -> the latest complete checkpoint in ``run_dir``
    (None when there is none); a path -> that checkpoint, which must be complete."""
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() == "true":
        done = [p for p in Path(run_dir).glob("checkpoint-*") if _NAME.match(p.name) and (p / META_FILE).is_file()]
        return max(done, key=lambda p: int(_NAME.match(p.name).group(1))) if done else None
    path = Path(value)
    if not (path / META_FILE).is_file():
        raise UsagePathError(f"--resume_from_checkpoint {value}: no {META_FILE} (not a complete checkpoint of a "
                                f"--backend megatron run)")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, layout) -> tuple[int, list[dict]]:
    """Restore weights, optimizer, scheduler and RNG on every rank; returns (step, log history so far)."""
    # megatron-core (the [megatron] extra), imported only when the backend runs
    from megatron.core import tensor_parallel

    meta = json.loads((path / META_FILE).read_text())
    tp_rank, pp_rank, dp_rank, dp_size = _ranks()
    saved = meta["parallel"]
    if (saved["tp"], saved["pp"], saved["vpp"]) != (layout.tp, layout.pp, layout.vpp):
        raise UsageValueError(f"--resume_from_checkpoint {path} was written at TP{saved['tp']} PP{saved['pp']} VPP{saved['vpp']}; resume with the "
                         f"same --tensor_model_parallel_size / --pipeline_model_parallel_size / "
                         f"--virtual_pipeline_model_parallel_size (the optimizer state is per shard)")
    chunks = [m.module for m in model]
    states = {vp: load_file(path / chunk_file(tp_rank, pp_rank, vp)) for vp in range(len(chunks))}
    if tp_rank > 0:  # the tower and projector are stored once, by TP rank 0
        first = load_file(path / chunk_file(0, pp_rank, 0))
        states[0].update({k: v for k, v in first.items() if k.startswith(("vision_model.", "multi_modal_projector."))})
    load_rank_state(chunks, states)
    optimizer.load_state_dict(torch.load(path / rank_dir(tp_rank, pp_rank) / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(meta["scheduler"])
    rank_file = path / "rng" / f"rank_{torch.distributed.get_rank()}.pt"
    if rank_file.is_file():
        rng = torch.load(rank_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    return int(meta["step"]), list(meta["log_history"])


def _rotate(run_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    done = sorted((p for p in run_dir.glob("checkpoint-*") if _NAME.match(p.name)),
                  key=lambda p: int(_NAME.match(p.name).group(1)))
    for old in done[:-limit]:
        shutil.rmtree(old)

