"""Conversion errors name what is wrong: the unclaimed key, the shape that does not split, the unknown model type.

Run:  .venv/bin/pytest tests/megatron/converter/test_megatron_errors.py -v
"""

from __future__ import annotations

import json

import pytest
import torch
from megatron_models import tiny_llama
from safetensors.torch import load_file, save_file

from llava.megatron.converter.convert_cli import main
from llava.megatron.converter.mcore_convert import hf_to_mcore


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("err") / "hf")


def _copy_with(src, dst, extra=None, config=None):
    dst.mkdir()
    weights = load_file(src / "model.safetensors")
    weights.update(extra or {})
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unclaimed_key_is_named(llama, tmp_path, capsys):
    src = _copy_with(llama, tmp_path / "src", extra={"model.layers.2.self_attn.sinks.weight": torch.zeros(2)})
    assert main(["hf2mcore", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'model.layers.2.self_attn.sinks.weight'" in err and "not claimed" in err and "'llama'" in err


def test_shape_not_divisible_by_tp_is_named(llama, tmp_path):
    """8 heads / 4 KV heads: TP 8 cannot hold whole query groups; TP 3 cannot split the 96-wide MLP either."""
    with pytest.raises(ValueError, match=r"linear_qkv\.weight' of shape \(128, 64\) across TP=8: its 4 query groups"):
        hf_to_mcore(llama, tmp_path / "tp8", tp=8)
    with pytest.raises(ValueError, match=r"of shape \(\d+, 64\) across TP=3"):
        hf_to_mcore(llama, tmp_path / "tp3", tp=3)


def test_missing_template_names_type(llama, tmp_path, capsys):
    src = _copy_with(llama, tmp_path / "src", config={"model_type": "gpt_neox"})
    assert main(["hf2mcore", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'gpt_neox'" in err and "llama" in err and "register_template" in err


def test_layers_not_divisible_by_pipeline(llama, tmp_path):
    with pytest.raises(ValueError, match=r"num_layers=4 is not divisible by pp\*vpp=2\*3=6"):
        hf_to_mcore(llama, tmp_path / "out", pp=2, vpp=3)


def test_missing_partner_tensor_is_named(llama, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    weights = load_file(llama / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text((llama / "config.json").read_text())
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_to_mcore(src, tmp_path / "out")


def test_refuses_non_empty_output(llama, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        hf_to_mcore(llama, tmp_path / "out")
