"""The shards hold Megatron's layout, checked against computations written here from the HF tensors alone.

Run:  .venv/bin/pytest tests/megatron/converter/test_megatron_layout.py -v

- fused QKV of one layer, built head by head in a loop (Megatron: per query group, its q heads then k then v),
  compared with what the converter wrote; its TP split gives each rank whole query groups;
- linear_fc1 on TP rank r is [gate rows of r; up rows of r]; linear_proj / linear_fc2 split by columns;
- PP/VPP renumbering (global layer -> stage, local index), embeddings first, norm + output last,
  tied embeddings copied to the last stage; vocab rows padded with zeros.
"""

from __future__ import annotations

import pytest
import torch
from megatron_models import VOCAB, tiny_llama, tiny_qwen2
from safetensors.torch import load_file

from llava.megatron.converter.mcore_convert import hf_to_mcore

HEADS, GROUPS, HEAD_DIM = 8, 4, 8  # tiny Llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    path = tiny_llama(root / "hf")
    return path, load_file(path / "model.safetensors"), root


def _shard(root, tp, pp, vp=0):
    return load_file(root / f"mp_rank_{tp:02d}_{pp:03d}" / f"model_chunk_{vp}.safetensors")


def _megatron_qkv_by_hand(q, k, v):
    rows = []
    for g in range(GROUPS):
        for h in range(g * HEADS // GROUPS, (g + 1) * HEADS // GROUPS):
            rows.append(q[h * HEAD_DIM : (h + 1) * HEAD_DIM])
        rows.append(k[g * HEAD_DIM : (g + 1) * HEAD_DIM])
        rows.append(v[g * HEAD_DIM : (g + 1) * HEAD_DIM])
    return torch.cat(rows)


def test_fused_qkv_matches_independent_layout(llama):
    path, hf, root = llama
    hf_to_mcore(path, root / "tp1")
    layer = 1
    q, k, v = (hf[f"model.layers.{layer}.self_attn.{p}_proj.weight"] for p in "qkv")
    expected = _megatron_qkv_by_hand(q, k, v)
    assert expected.shape == ((HEADS + 2 * GROUPS) * HEAD_DIM, 64)
    assert torch.equal(_shard(root / "tp1", 0, 0)[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"], expected)


def test_tp2_shards(llama):
    path, hf, root = llama
    hf_to_mcore(path, root / "tp2", tp=2)
    q, k, v = (hf[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    full_qkv = _megatron_qkv_by_hand(q, k, v)
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    o, down = hf["model.layers.0.self_attn.o_proj.weight"], hf["model.layers.0.mlp.down_proj.weight"]
    rows = full_qkv.shape[0] // 2  # 2 whole query groups per rank
    for r in range(2):
        shard = _shard(root / "tp2", r, 0)
        pre = "decoder.layers.0."
        assert torch.equal(shard[pre + "self_attention.linear_qkv.weight"], full_qkv[r * rows : (r + 1) * rows])
        assert torch.equal(
            shard[pre + "mlp.linear_fc1.weight"], torch.cat([gate[r * 48 : (r + 1) * 48], up[r * 48 : (r + 1) * 48]])
        )
        assert torch.equal(shard[pre + "self_attention.linear_proj.weight"], o[:, r * 32 : (r + 1) * 32])
        assert torch.equal(shard[pre + "mlp.linear_fc2.weight"], down[:, r * 48 : (r + 1) * 48])
        assert torch.equal(shard[pre + "input_layernorm.weight"], hf["model.layers.0.input_layernorm.weight"])
        assert torch.equal(
            shard[pre + "pre_mlp_layernorm.weight"], hf["model.layers.0.post_attention_layernorm.weight"]
        )
        emb = shard["embedding.word_embeddings.weight"]  # vocab 100 padded to 256, 128 rows per rank
        padded = torch.cat([hf["model.embed_tokens.weight"], torch.zeros(256 - VOCAB, 64)])
        assert torch.equal(emb, padded[r * 128 : (r + 1) * 128])


def test_pp_vpp_renumbering(llama):
    """4 layers, PP2 x VPP2: chunk c = vp*2 + pp holds global layer c, as local layer 0."""
    path, hf, root = llama
    hf_to_mcore(path, root / "vpp", pp=2, vpp=2)
    for pp in range(2):
        for vp in range(2):
            shard = _shard(root / "vpp", 0, pp, vp)
            layers = {k.split(".")[2] for k in shard if k.startswith("decoder.layers.")}
            assert layers == {"0"}
            global_layer = vp * 2 + pp
            expected = hf[f"model.layers.{global_layer}.input_layernorm.weight"]
            assert torch.equal(shard["decoder.layers.0.input_layernorm.weight"], expected)
            assert ("embedding.word_embeddings.weight" in shard) == ((pp, vp) == (0, 0))
            last = (pp, vp) == (1, 1)
            assert ("output_layer.weight" in shard) == last and ("decoder.final_layernorm.weight" in shard) == last
    out = _shard(root / "vpp", 0, 1, 1)["output_layer.weight"]
    assert torch.equal(out[:VOCAB], hf["lm_head.weight"]) and torch.count_nonzero(out[VOCAB:]) == 0


def test_tied_embeddings_on_both_stages(tmp_path):
    path = tiny_qwen2(tmp_path / "hf")
    hf = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in hf
    hf_to_mcore(path, tmp_path / "pp2", pp=2)
    first, last = _shard(tmp_path / "pp2", 0, 0), _shard(tmp_path / "pp2", 0, 1)
    assert "output_layer.weight" not in first
    assert torch.equal(first["embedding.word_embeddings.weight"], last["output_layer.weight"])
    assert torch.equal(last["output_layer.weight"][:VOCAB], hf["model.embed_tokens.weight"])
    bias = first["decoder.layers.0.self_attention.linear_qkv.bias"]  # per-group [q; k; v] biases, 4 groups of 1 head
    q, k, v = (hf[f"model.layers.0.self_attn.{p}_proj.bias"] for p in "qkv")
    expected = torch.cat(
        [torch.cat([q[g * 16 : (g + 1) * 16], k[g * 16 : (g + 1) * 16], v[g * 16 : (g + 1) * 16]]) for g in range(4)]
    )
    assert torch.equal(bias, expected)
    hf_to_mcore(path, tmp_path / "pp1")  # PP1: one module holds both ends; no separate output layer
    assert "output_layer.weight" not in _shard(tmp_path / "pp1", 0, 0)
