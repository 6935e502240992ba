"""Multi-process training on CPU: make every rank know its rank (gloo), without patching accelerate.

    deepspeed --num_gpus 2 --module llava.train.train --deepspeed zero_configs/zero3.json ...   # CPU: gloo
    torchrun --nproc_per_node 2 -m llava.train.train ...                                       # CPU: gloo

Measured with accelerate 1.15: on a machine without an accelerator, ``PartialState`` finds no backend for the
launcher's ``LOCAL_RANK`` and reports ``process_index 0`` / ``num_processes 1`` on every rank, although DeepSpeed
(or torch) has initialised a gloo process group. Every rank then acts as rank 0 (all of them write checkpoints), the
data is not sharded, and DeepSpeed's "auto" ``train_batch_size`` is filled for one process and fails its own check.

- Under DeepSpeed, :func:`repair_cpu_process_state` copies rank, world size and local rank from the initialised
  process group into accelerate's shared state (the backend is gloo). DeepSpeed itself already has them.
- Without DeepSpeed (``torchrun``), :func:`wants_cpu_ddp` makes TrainingArguments take accelerate's own MULTI_CPU
  path (``--use_cpu``), which initialises gloo and wraps the model in DDP.

Nothing changes where CUDA (or any accelerator accelerate knows) is present: both functions return early.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def wants_cpu_ddp(deepspeed_config) -> bool:
    """True for a multi-process launch without DeepSpeed on a machine with no accelerator."""
    return not deepspeed_config and _launched_world_size() > 1 and not _has_accelerator()


def repair_cpu_process_state(state) -> bool:
    """Give accelerate's ``PartialState`` the rank and world size of the initialised gloo group (DeepSpeed on CPU).

    Returns True when it changed something. The state is shared (Borg pattern), so the ``AcceleratorState`` the
    Trainer builds later sees the same values.
    """
    if _has_accelerator() or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if world <= 1 or state.num_processes == world:
        return False
    logger.info("CPU multi-process run: setting rank %d of %d (gloo) in accelerate's state", rank, world)
    state.backend = torch.distributed.get_backend()
    state.num_processes = world
    state.process_index = rank
    state.local_process_index = int(os.environ.get("LOCAL_RANK", rank))
    return True


SHM_DIR = "/dev/shm"


def deepspeed_shm_name(rank: int) -> str:
    """The shared-memory segment DeepSpeed's CPU all-reduce creates for ``rank`` (``ops/csrc/cpu/comm/shm.cpp``:
    ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``)."""
    return (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_deepspeed_shm() -> bool:
    """Unlink this rank's DeepSpeed CPU all-reduce segment once every rank has mapped it; True if one was removed.

    DeepSpeed 0.19 on CPU (``deepspeed --num_gpus N``, all ranks on one machine) creates a ~67 MB ``/dev/shm``
    segment per rank at ``init_distributed`` and never unlinks it: every run left its segments behind (measured:
    232 files, 15 GB of the machine's RAM after a day of test runs). Each rank maps every peer's segment inside
    ``init_distributed``, so after a barrier the names are no longer needed; the mappings stay valid and the memory
    returns when the processes exit, crashed or not.
    """
    if _has_accelerator() or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    path = os.path.join(SHM_DIR, deepspeed_shm_name(torch.distributed.get_rank()))
    torch.distributed.barrier()  # every rank is past init_distributed, so it has opened its peers' segments
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    logger.info("released DeepSpeed's CPU all-reduce segment %s (still mapped; freed when the run ends)", path)
    return True


def finish_distributed_process() -> None:
    """End a successful multi-process run: a barrier, the process group destroyed, then the process exits (code 0).

    Called by the entry points after ``train()`` returns (not by ``train()``: in-process callers keep their group).
    Without a process group it does nothing; a one-rank group (the Megatron backend's in one process, which may be a
    test runner's) is destroyed and the function returns, so the caller ends as usual.

    Why the process exits here: gloo has no shutdown (``destroy_process_group`` leaves its threads running; measured
    after it on every rank of a ZeRO-3 run: 4 ``pt_gloo_runloop`` and 2 ``gloo_tcp_loop`` threads, and rank 0's
    ``pt_tcpstore_uv``, with DeepSpeed's module-level groups still holding a group). Interpreter teardown then
    destroys them in no set order; rarely (one two-process test in one of four full suite runs) a finished run aborted
    with ``terminate called without an active exception`` (exit -6, which ``deepspeed`` reports as 250) after every
    file was written. So the Python exit handlers run (logging, wandb, multiprocessing), the streams are flushed, and
    ``os._exit(0)`` skips the native teardown.
    """

    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    dist.barrier()
    dist.destroy_process_group()
    if world == 1:
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
