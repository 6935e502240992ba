"""Conversion ops, config conversion and the streaming safetensors reader/writer, on known values.

Run:  .venv/bin/pytest tests/megatron/converter/test_megatron_ops_config.py -v
"""

from __future__ import annotations

import pytest
import torch
from megatron_models import llama_config
from safetensors import safe_open

from llava.megatron.converter.conversion_ops import QKVConverOp, RenameConverOp, StackConverOp, fill_name, match_name
from llava.megatron.converter.conversion_templates import get_conversion_template
from llava.megatron.converter.mcore_config import hf_to_mca_config, mca_to_hf_config
from llava.megatron.converter.parallel_layout import merge_tp, padded_vocab_size, split_tp
from llava.safetensors_io import SafetensorsReader, SafetensorsWriter


def test_qkv_on_known_values():
    """2 heads, 1 group, head dim 1: q=[0,1], k=[2], v=[3] -> [0,1,2,3]; 2 groups -> [q0,k0,v0,q1,k1,v1]."""
    op = QKVConverOp(["q", "k", "v"], "qkv")
    mqa = {"num_attention_heads": 2, "num_query_groups": 1, "kv_channels": 1}
    (fused,) = op.hf_to_mca([torch.tensor([0.0, 1]), torch.tensor([2.0]), torch.tensor([3.0])], mqa)
    assert fused.tolist() == [0, 1, 2, 3]
    mha = {"num_attention_heads": 2, "num_query_groups": 2, "kv_channels": 1}
    q, k, v = torch.tensor([10.0, 11]), torch.tensor([20.0, 21]), torch.tensor([30.0, 31])
    (fused,) = op.hf_to_mca([q, k, v], mha)
    assert fused.tolist() == [10, 20, 30, 11, 21, 31]
    assert [t.tolist() for t in op.mca_to_hf([fused], mha)] == [[10, 11], [20, 21], [30, 31]]


def test_qkv_inverse_with_gqa_weights():
    cfg = {"num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 4}
    op = QKVConverOp(["q", "k", "v"], "qkv")
    q, k, v = torch.randn(32, 6), torch.randn(8, 6), torch.randn(8, 6)
    (fused,) = op.hf_to_mca([q, k, v], cfg)
    assert torch.equal(fused[16:20], k[:4]) and torch.equal(fused[44:48], v[4:])  # group 0's k, group 1's v
    back = op.mca_to_hf([fused], cfg)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_stack_and_swiglu_split():
    gate, up = torch.arange(8.0).reshape(4, 2), -torch.arange(8.0).reshape(4, 2)
    (fc1,) = StackConverOp(["gate", "up"], "fc1").hf_to_mca([gate, up], {})
    shards = split_tp("decoder.layers.0.mlp.linear_fc1.weight", fc1, 2)
    assert torch.equal(shards[1], torch.cat([gate[2:], up[2:]]))
    assert torch.equal(merge_tp("decoder.layers.0.mlp.linear_fc1.weight", shards), fc1)
    g, u = StackConverOp(["gate", "up"], "fc1").mca_to_hf([fc1], {})
    assert torch.equal(g, gate) and torch.equal(u, up)


def test_wildcard_names():
    assert match_name("vision_tower.{}", "vision_tower.encoder.layers.0.fc1.weight") == "encoder.layers.0.fc1.weight"
    assert match_name("vision_tower.{}", "model.vision_tower.x") is None
    assert match_name(".mlp.up_proj.weight", ".mlp.up_proj.weight") == ""
    assert fill_name("vision_model.{}", "a.b") == "vision_model.a.b"
    op = RenameConverOp("vision_tower.{}", "vision_model.{}")
    assert op.hf_to_mca([torch.ones(1)], {})[0].item() == 1


def test_llava_resolves_through_text_template():
    llava = get_conversion_template("llava")
    cfg = {"model_type": "llava", "text_config": {"model_type": "qwen2"}}
    resolved = llava.resolve(cfg, ["language_model.model.embed_tokens.weight"])
    assert resolved.variant == "legacy"
    claim = resolved.claim_hf("language_model.model.layers.3.self_attn.q_proj.bias")
    assert claim.layer == 3 and resolved.mca_keys(claim) == ["decoder.layers.3.self_attention.linear_qkv.bias"]
    claim = resolved.claim_hf("vision_tower.encoder.layers.0.mlp.fc1.weight")
    assert resolved.mca_keys(claim) == ["vision_model.encoder.layers.0.mlp.fc1.weight"]
    modules = llava.resolve(cfg, ["model.language_model.embed_tokens.weight"])
    assert modules.variant == "modules"
    assert modules.mca_keys(modules.claim_hf("lm_head.weight")) == ["output_layer.weight"]


def test_config_known_values_and_reverse():
    hf = llama_config(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    ).to_dict()
    template = get_conversion_template("llama")
    mca = hf_to_mca_config(hf, template)
    expected = {
        "num_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_query_groups": 4,
        "ffn_hidden_size": 96,
        "kv_channels": 8,
        "layernorm_epsilon": 1e-5,
        "vocab_size": 100,
        "share_embeddings_and_output_weights": False,
        "rotary_base": 500000.0,
        "rope_scaling": True,
        "rope_scaling_factor": 32.0,
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
    }
    assert {k: mca[k] for k in expected} == expected
    rebuilt = mca_to_hf_config(mca, template)  # no original: every mapped field from the MCA config alone
    for key in (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
    ):
        assert rebuilt[key] == hf[key], key
    assert rebuilt["rope_parameters"]["rope_theta"] == 500000.0 and rebuilt["rope_parameters"]["factor"] == 32.0
    assert mca_to_hf_config(mca, template, hf) == hf
    changed = mca_to_hf_config({**mca, "rotary_base": 1e6}, template, hf)  # an MCA change reaches the HF config
    assert changed["rope_parameters"]["rope_theta"] == 1e6


def test_config_linear_scaling_and_transformers4_style():
    hf = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "vocab_size": 10,
        "rope_theta": 1e6,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    mca = hf_to_mca_config(hf, get_conversion_template("qwen2"))
    assert mca["rotary_base"] == 1e6 and mca["seq_len_interpolation_factor"] == 4.0 and mca["add_qkv_bias"]
    assert mca["num_query_groups"] == 4 and mca["kv_channels"] == 16
    assert mca_to_hf_config(mca, get_conversion_template("qwen2"), hf) == hf


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope_type='yarn'"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "rope_theta": 1e4}, "low_freq_factor=2.0"),
    ],
)
def test_config_rejects_unrepresentable_rope(rope, message):
    hf = llama_config().to_dict()
    hf["rope_parameters"] = rope
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        hf_to_mca_config(hf, get_conversion_template("llama"))


def test_padded_vocab_size():
    assert padded_vocab_size(100, 1) == 128 and padded_vocab_size(100, 4) == 512
    assert padded_vocab_size(151936, 2, 128) == 152064 and padded_vocab_size(256, 2, 128) == 256


def test_streaming_writer_reader_roundtrip(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(4).to(torch.bfloat16),
        "empty": torch.empty(0, 3),
    }
    writer = SafetensorsWriter(tmp_path / "x.safetensors", {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    for k in ("c", "a", "empty", "b"):  # any order
        writer.write(k, tensors[k])
    assert writer.missing() == []
    with safe_open(tmp_path / "x.safetensors", "pt") as f:  # the reference reader accepts the file
        assert f.metadata() == {"format": "pt"}
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t)
    reader = SafetensorsReader(tmp_path / "x.safetensors")
    assert reader.meta("a") == (torch.float32, (3, 5))
    assert torch.equal(reader.get("c"), tensors["c"])
    with pytest.raises(ValueError, match="planned as"):
        writer.write("a", torch.randn(5, 3))
