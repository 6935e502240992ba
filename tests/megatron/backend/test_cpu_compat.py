"""The CPU shims of ``llava/megatron/backend/cpu_compat.py``, each against what it stands in for.

Run:  .venv/bin/pytest tests/megatron/backend/test_cpu_compat.py -v      (needs megatron-core)

The RNG tracker's forked draws equal a generator seeded alike and leave the default sequence alone; the clipping
shim scales gradients as ``torch.nn.utils.clip_grad_norm_`` does; installing the shims (in a subprocess, so this
process's torch stays unpatched) redirects exactly the CUDA calls megatron-core makes and lets megatron-core's
``FP32Optimizer`` clip and step on CPU.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("megatron.core")

from llava.megatron.backend.cpu_compat import CpuRNGStatesTracker, _clip_grad_by_total_norm_fp32  # noqa: E402


def test_rng_tracker_fork_draws_from_its_own_seed_and_restores_the_default():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 1234)
    torch.manual_seed(0)
    expected_default = torch.rand(3)
    own = torch.Generator().manual_seed(1234)
    expected_forked = torch.rand(4, generator=own), torch.rand(2, generator=own)

    torch.manual_seed(0)
    with tracker.fork():
        first = torch.rand(4)
    default = torch.rand(3)
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(2)  # continues the forked stream
    assert torch.equal(first, expected_forked[0]) and torch.equal(second, expected_forked[1])
    assert torch.equal(default, expected_default)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("other", 1234)
    with pytest.raises(ValueError, match="was not added"):
        with tracker.fork("missing"):
            pass


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_shim_scales_like_torch_clip_grad_norm(max_norm):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for rp, p in zip(ref_params, params):
        rp.grad = p.grad.clone()
    total = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
    _clip_grad_by_total_norm_fp32(params, max_norm, float(total))
    for p, rp in zip(params, ref_params):
        torch.testing.assert_close(p.grad, rp.grad, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_installed_shims_run_megatron_fp32_optimizer_on_cpu():
    """In a fresh process: the shim list, CUDA factory calls landing on CPU, and megatron-core's own FP32Optimizer
    (its ``_scale`` is allocated on "cuda") clipping to ``clip_grad`` and stepping like ``torch.optim.AdamW``."""
    code = textwrap.dedent("""
        import torch
        assert not torch.cuda.is_available()
        from llava.megatron.backend.cpu_compat import install_cpu_shims
        names = install_cpu_shims()
        assert install_cpu_shims() == names  # idempotent
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.tensor([1.0], device=torch.device("cuda")).device.type == "cpu"
        assert torch.cuda.current_device() == torch.device("cpu")
        t = torch.ones(2)
        assert t.cuda() is t
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer.optimizer import FP32Optimizer
        torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        from megatron.core import parallel_state
        parallel_state.initialize_model_parallel()
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 3, generator=gen)); ref = torch.nn.Parameter(w.detach().clone())
        g = torch.randn(4, 3, generator=gen) * 10
        config = OptimizerConfig(optimizer="adam", lr=0.1, clip_grad=1.0, weight_decay=0.0)
        opt = FP32Optimizer(torch.optim.AdamW([w], lr=0.1, weight_decay=0.0), config, init_state_fn=None)
        w.grad = g.clone(); w.main_grad = w.grad
        ok, norm, _ = opt.step()
        ref_opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0)
        ref.grad = g.clone(); torch.nn.utils.clip_grad_norm_([ref], 1.0); ref_opt.step()
        assert ok and abs(norm - g.norm().item()) < 1e-4 * g.norm().item(), norm
        torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
        print("OK", names)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
