"""megatron-core on a machine without a GPU: the few places where it assumes CUDA, redirected to the CPU.

    from llava.megatron.backend.cpu_compat import install_cpu_shims
    install_cpu_shims()          # before building megatron-core models; does nothing when a GPU is present

Users debug on laptops and CI has no GPU, so the Megatron backend (``llava train --backend megatron``) runs on CPU
with gloo. megatron-core 0.16.1 itself runs there, its optimizer, DDP wrapper and pipeline schedules included,
once these calls stop asking for CUDA (each measured to be needed on torch 2.13 CPU; nothing else is patched):

| shim                                               | megatron-core call it covers                                |
|----------------------------------------------------|-------------------------------------------------------------|
| ``torch.cuda.current_device()`` -> CPU device      | weight/grad-buffer allocation (``device=current_device()``) |
|                                                    | in tensor_parallel layers, ``RotaryEmbedding``, DDP buffers |
| ``Tensor.cuda()`` -> the tensor itself             | ``GPTModel.setup_embeddings_and_output_layer`` (tied        |
|                                                    | embeddings all-reduced between first and last PP stage)     |
| ``torch.{tensor,empty,zeros,ones,full}(device=     | ``FP32Optimizer`` (its ``_scale``), ``clip_grads.           |
| "cuda")`` -> CPU                                   | get_grad_norm_fp32`` (norm accumulators)                    |
| ``torch.cuda.synchronize()`` -> no-op              | timers / DDP / optimizer step                               |
| ``CpuRNGStatesTracker`` as the RNG tracker         | ``tensor_parallel.get_cuda_rng_tracker().fork()`` around    |
|                                                    | dropout and ``model_parallel_cuda_manual_seed``: named      |
|                                                    | states of the CPU generator instead of CUDA ones            |
| ``clip_grad_by_total_norm_fp32`` without its       | ``MegatronOptimizer.clip_grad_norm`` (asserts               |
| ``torch.cuda.FloatTensor`` assert                  | ``param.grad.type() == 'torch.cuda.FloatTensor'``); same    |
|                                                    | coefficient ``max_norm / (norm + 1e-6)``, applied when < 1  |

The shims are process-wide and installed once; ``install_cpu_shims`` returns the names installed (empty with a
GPU). Tested by ``tests/megatron/backend/test_megatron_train.py`` (training on CPU under megatron-core's own optimizer and
schedules) and ``tests/megatron/backend/test_cpu_compat.py``.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_INSTALLED: list[str] = []
_FACTORIES = ("tensor", "empty", "zeros", "ones", "full")


def _cpu_device_arg(device):
    if device is None:
        return None
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device_arg(kwargs["device"])
        return fn(*args, **kwargs)

    wrapper.__llava_cpu_shim__ = True
    return wrapper


class CpuRNGStatesTracker:
    """megatron-core's RNG tracker interface (``add``, ``fork``, ``get_states``, ``set_states``, ``reset``) over
    named states of the CPU generator: ``fork(name)`` swaps that state in, runs the block (dropout), stores the
    advanced state and puts the caller's back, so forked draws never disturb the default sequence."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"RNG state {name!r} was not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad: bool = False) -> None:
    """``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32`` without its CUDA-type assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def install_rng_tracker() -> None:
    """Make a ``CpuRNGStatesTracker`` megatron-core's RNG tracker (what ``initialize_rng_tracker`` would create)."""
    # megatron-core (the [megatron] extra), imported only when the backend runs
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def install_cpu_shims(force: bool = False) -> list[str]:
    """Install the shims listed in the module docstring when no GPU is present (or ``force``); idempotent."""
    if (torch.cuda.is_available() and not force) or _INSTALLED:
        return list(_INSTALLED)
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    for name in _FACTORIES:
        setattr(torch, name, _cpu_factory(getattr(torch, name)))
    # megatron-core (the [megatron] extra), imported only when the backend runs
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    install_rng_tracker()
    _INSTALLED.extend(
        ["torch.cuda.current_device", "Tensor.cuda", "torch.cuda.synchronize", *(f"torch.{n}(device='cuda')" for n in
         _FACTORIES), "clip_grad_by_total_norm_fp32", "rng_tracker"]
    )
    return list(_INSTALLED)
