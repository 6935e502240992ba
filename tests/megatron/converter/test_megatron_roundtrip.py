"""Round trips HF -> MCA -> HF are bit-exact (every tensor, dtype, key set, config.json bytes, other files).

Run:  .venv/bin/pytest tests/megatron/converter/test_megatron_roundtrip.py -v        (torch + safetensors only)

Models: tiny Llama (GQA, untied), Qwen2 (biases, tied), Llava (CLIP tower + projector passed through), plus
Qwen3 (q/k norms) and Mistral at one layout. Layouts: TP 1/2/4 x PP 1/2, and PP 2 x VPP 2. Also: a checkpoint
resharded to another TP/PP exports the same HF checkpoint, and its shards equal a direct import at that layout.
"""

from __future__ import annotations

import filecmp
import json

import pytest
import torch
from megatron_models import BUILDERS
from safetensors.torch import load_file

from llava.megatron.converter.convert_cli import main
from llava.megatron.converter.mcore_convert import hf_to_mcore, mcore_to_hf, mcore_to_mcore

LAYOUTS = [(1, 1, None), (2, 1, None), (4, 1, None), (1, 2, None), (2, 2, None), (4, 2, None), (2, 2, 2)]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _weights(path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    return {k: v for f in files for k, v in load_file(f).items()}


def assert_same_checkpoint(expected_dir, actual_dir) -> None:
    expected, actual = _weights(expected_dir), _weights(actual_dir)
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key], tensor), f"{key} differs after the round trip"
    other = sorted(p.name for p in expected_dir.iterdir() if p.suffix != ".safetensors")
    assert other == sorted(p.name for p in actual_dir.iterdir() if p.suffix != ".safetensors")
    for name in other:  # config.json, generation_config.json: byte for byte
        assert filecmp.cmp(expected_dir / name, actual_dir / name, shallow=False), name


@pytest.mark.parametrize("tp,pp,vpp", LAYOUTS)
@pytest.mark.parametrize("model", ["llama", "qwen2", "llava"])
def test_roundtrip_bit_exact(hf_dirs, tmp_path, model, tp, pp, vpp):
    meta = hf_to_mcore(hf_dirs[model], tmp_path / "mca", tp=tp, pp=pp, vpp=vpp)
    assert meta["parallel"]["padded_vocab_size"] == 128 * tp
    for t in range(tp):  # one file per (tp, pp, vp) rank
        for p in range(pp):
            for v in range(vpp or 1):
                assert (tmp_path / "mca" / f"mp_rank_{t:02d}_{p:03d}" / f"model_chunk_{v}.safetensors").is_file()
    mcore_to_hf(tmp_path / "mca", tmp_path / "hf")
    assert_same_checkpoint(hf_dirs[model], tmp_path / "hf")


@pytest.mark.parametrize("model", ["qwen3", "mistral"])
def test_roundtrip_other_families(hf_dirs, tmp_path, model):
    hf_to_mcore(hf_dirs[model], tmp_path / "mca", tp=2, pp=2)
    mcore_to_hf(tmp_path / "mca", tmp_path / "hf")
    assert_same_checkpoint(hf_dirs[model], tmp_path / "hf")


@pytest.mark.parametrize("model", ["llama", "qwen2", "llava"])
def test_reshard_then_export(hf_dirs, tmp_path, model):
    """Import at TP2/PP2, reshard to TP4/PP1 and to TP1/PP2/VPP2; both export the original checkpoint."""
    hf_to_mcore(hf_dirs[model], tmp_path / "a", tp=2, pp=2)
    mcore_to_mcore(tmp_path / "a", tmp_path / "b", tp=4, pp=1)
    mcore_to_mcore(tmp_path / "b", tmp_path / "c", tp=1, pp=2, vpp=2)
    for name in ("b", "c"):
        mcore_to_hf(tmp_path / name, tmp_path / f"hf_{name}")
        assert_same_checkpoint(hf_dirs[model], tmp_path / f"hf_{name}")
    hf_to_mcore(hf_dirs[model], tmp_path / "direct", tp=4, pp=1)  # resharded shards == a direct import
    for t in range(4):
        rel = f"mp_rank_{t:02d}_000/model_chunk_0.safetensors"
        direct, resharded = load_file(tmp_path / "direct" / rel), load_file(tmp_path / "b" / rel)
        assert sorted(direct) == sorted(resharded)
        assert all(torch.equal(direct[k], resharded[k]) for k in direct)


def test_cli_roundtrip_and_tied_lm_head_copy(hf_dirs, tmp_path):
    """Through the CLI; a tied checkpoint that also stores lm_head.weight gets it back (as a copy)."""
    src = tmp_path / "src"
    src.mkdir()
    weights = _weights(hf_dirs["qwen2"])
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    from safetensors.torch import save_file

    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text((hf_dirs["qwen2"] / "config.json").read_text())
    assert main(["hf2mcore", "--tp", "2", "--pp", "2", str(src), str(tmp_path / "mca")]) == 0
    assert main(["mcore2hf", str(tmp_path / "mca"), str(tmp_path / "hf")]) == 0
    assert_same_checkpoint(src, tmp_path / "hf")
    meta = json.loads((tmp_path / "mca" / "mca_config.json").read_text())
    assert meta["hf"]["tied_lm_head_saved"] is True


def test_export_writes_loadable_sharded_checkpoint(hf_dirs, tmp_path):
    """Above max_shard_bytes the export is sharded with an index that transformers loads."""
    import transformers

    hf_to_mcore(hf_dirs["llama"], tmp_path / "mca", tp=2)
    mcore_to_hf(tmp_path / "mca", tmp_path / "hf", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama"])
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name
