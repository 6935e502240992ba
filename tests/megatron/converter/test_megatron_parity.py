"""Logit parity: our converted shards loaded into megatron-core's own GPTModel vs the HF model, fp32, on CPU.

Run:  .venv/bin/pytest tests/megatron/converter/test_megatron_parity.py -v      (needs `pip install .[megatron]`)

For Llama (GQA, untied) and Qwen2 (q/k/v biases, tied embeddings), at TP1/PP1, TP2/PP1 and TP2/PP2 (gloo,
tp*pp processes, see megatron_harness.py): max |logits_mcore - logits_hf| <= 1e-5 over the real vocab, and the
padded vocab columns are exactly 0. Negative control: shards with a naive q;k;v concatenation, or with
linear_fc1 as [up; gate], fail the same check.
"""

from __future__ import annotations

import pytest
import torch
from megatron_models import VOCAB, hf_logits, tiny_llama, tiny_qwen2
from safetensors.torch import load_file, save_file

from llava.megatron.converter.mcore_convert import hf_to_mcore

pytest.importorskip("megatron.core")
from megatron_harness import run_gpt_logits  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TOL = 1e-5


LAYOUTS = [(1, 1), (2, 1), (2, 2)]


def _rewrite(ckpt, fn) -> None:
    file = ckpt / "mp_rank_00_000" / "model_chunk_0.safetensors"
    state = load_file(file)
    save_file({key: fn(key, t) for key, t in state.items()}, file, metadata={"format": "pt"})


def _negative_controls(root, llama_path):
    """Llama shards with a naive q;k;v concatenation, and with linear_fc1 stored as [up; gate]."""
    raw = load_file(llama_path / "model.safetensors")
    naive_qkv, swapped_fc1 = root / "naive_qkv", root / "swapped_fc1"
    for d in (naive_qkv, swapped_fc1):
        hf_to_mcore(llama_path, d)

    def naive(key, t):
        if not key.endswith("linear_qkv.weight"):
            return t
        layer = key.split(".")[2]
        return torch.cat([raw[f"model.layers.{layer}.self_attn.{p}_proj.weight"] for p in "qkv"])

    _rewrite(naive_qkv, naive)
    _rewrite(swapped_fc1, lambda key, t: torch.cat(t.chunk(2)[::-1]) if key.endswith("linear_fc1.weight") else t)
    return [naive_qkv, swapped_fc1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Everything megatron-core computes, in one spawn of 4 processes: {(name, tp, pp): logits}, HF logits."""
    root = tmp_path_factory.mktemp("parity")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    hf = {}
    for name, build in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        path = build(root / name)
        hf[name] = (path, hf_logits(path, ids))
    jobs, labels = [], []
    for tp, pp in LAYOUTS:
        dirs = []
        for name, (path, _) in hf.items():
            dirs.append(root / f"{name}_tp{tp}_pp{pp}")
            hf_to_mcore(path, dirs[-1], tp=tp, pp=pp)
            labels.append((name, tp, pp))
        if (tp, pp) == (1, 1):
            dirs += _negative_controls(root, hf["llama"][0])
            labels += [("naive_qkv", 1, 1), ("swapped_fc1", 1, 1)]
        jobs.append((tp, pp, dirs))
    logits = [t for job in run_gpt_logits(jobs, ids) for t in job]
    return dict(zip(labels, logits)), {name: ref for name, (_, ref) in hf.items()}


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logits_match_hf(results, name, tp, pp):
    mcore, hf = results
    logits, expected = mcore[(name, tp, pp)], hf[name]
    assert logits.shape[:2] == expected.shape[:2] and logits.shape[-1] == 128 * tp  # vocab padded to 128 x TP
    diff = (logits[..., :VOCAB] - expected).abs().max().item()
    print(f"{name} tp={tp} pp={pp}: max abs diff {diff:.3g}")  # shown with pytest -s
    assert diff <= TOL, f"{name} tp={tp} pp={pp}: max abs diff {diff}"
    assert torch.count_nonzero(logits[..., VOCAB:]) == 0, "padded vocab rows must be zero"


@pytest.mark.parametrize("control", ["naive_qkv", "swapped_fc1"])
def test_negative_control_wrong_layout_fails(results, control):
    mcore, hf = results
    diff = (mcore[(control, 1, 1)][..., :VOCAB] - hf["llama"]).abs().max().item()
    print(f"negative control {control}: max abs diff {diff:.3g}")
    assert diff > 1e-2, f"{control}: a wrong layout should break parity, got max abs diff {diff}"
