"""The run directory (``llava/run_dir.py``) and the one Hugging Face shard writer (``llava/safetensors_io.py``).

    .venv/bin/pytest tests/test_run_dir.py

What each kind of run writes is read back with ``run_kind`` in the tests that produce it (stage1/full:
``tests/train/test_train_e2e.py``; lora/qlora/merged: ``tests/export/test_merge.py``; imported:
``tests/export/test_import_llava.py``). Here: directories written by earlier versions (no ``run_kind`` recorded),
missing files, arguments read back, and shards that plain ``transformers`` and ``safetensors`` load.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from llava.run_dir import (
    ARGS_FILE,
    RunKind,
    atomic_write_text,
    model_args_from_run,
    read_run_args,
    run_kind,
)
from llava.safetensors_io import HFShardWriter, parse_size

# what each kind held before run_kind was recorded: (llava_args.json, files)
LEGACY = {
    RunKind.STAGE1: ({"projector_only": True, "training_args": {}}, ["mm_projector.safetensors"]),
    RunKind.FULL: ({"projector_only": False, "training_args": {"lora_enable": False}}, ["config.json"]),
    RunKind.LORA: ({"projector_only": False, "training_args": {"lora_enable": True, "bits": 16}},
                   ["adapter_config.json", "adapter_model.safetensors"]),
    RunKind.QLORA: ({"projector_only": False, "training_args": {"lora_enable": True, "bits": 4}},
                    ["adapter_config.json", "adapter_model.safetensors"]),
    RunKind.MERGED: ({"merged_from": "out/lora", "projector_only": False, "training_args": {"lora_enable": True}},
                     ["config.json"]),
    RunKind.IMPORTED: ({"imported_from": "llava-v1.5-7b", "projector_only": False}, ["config.json"]),
}


@pytest.mark.parametrize("kind", list(RunKind))
def test_kind_of_directories_without_a_recorded_kind(kind, tmp_path):
    args, files = LEGACY[kind]
    (tmp_path / ARGS_FILE).write_text(json.dumps(args))
    for name in files:
        (tmp_path / name).write_text("{}")
    assert run_kind(tmp_path) is kind
    (tmp_path / files[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=files[-1]):
        run_kind(tmp_path)


def test_recorded_kind_wins_and_missing_args_file_names_the_directory(tmp_path):
    (tmp_path / ARGS_FILE).write_text(json.dumps({"run_kind": "merged", "projector_only": True}))
    (tmp_path / "config.json").write_text("{}")
    assert run_kind(tmp_path) is RunKind.MERGED
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nothing'} has no {ARGS_FILE}"):
        read_run_args(tmp_path / "nothing")


def test_model_args_from_run_ignores_unknown_keys_and_applies_overrides():
    run = {"model_args": {"model_name_or_path": "llm", "vision_tower": "clip", "mm_vision_select_layer": -1,
                          "a_flag_of_a_later_version": 3}}
    margs = model_args_from_run(run, model_name_or_path="other", pretrain_mm_mlp_adapter=None)
    assert (margs.model_name_or_path, margs.vision_tower, margs.mm_vision_select_layer) == ("other", "clip", -1)
    assert margs.version == "vicuna_v1"  # a default
    with pytest.raises(ValueError, match="--mm_projector_type"):  # validated as when parsed
        model_args_from_run({"model_args": {"model_name_or_path": "llm", "mm_projector_type": "linear"}})


def test_atomic_write_leaves_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.json", "1")
    atomic_write_text(path, "2")
    assert path.read_text() == "2" and sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5MiB") == 3 * 2**19 and parse_size(" 1000 ") == 1000


@pytest.mark.parametrize("max_bytes", [10**9, 40_000])
def test_shard_writer_output_loads_with_transformers(max_bytes, tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    state = model.state_dict()
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    writer = HFShardWriter(tmp_path, layout, max_bytes)
    for name in reversed(list(state)):  # any order
        writer.write(name, state[name])
    writer.close()
    config.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_bytes > 10**6:
        assert files == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        n = len(files)
        assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(files)
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
        for name in files:  # every shard within the limit unless it holds a single larger tensor
            with safe_open(str(tmp_path / name), "pt") as f:
                sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
            assert sum(sizes) <= max_bytes or len(sizes) == 1
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_shard_writer_refuses_unplanned_and_missing_tensors(tmp_path):
    writer = HFShardWriter(tmp_path, {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}, 10**6)
    with pytest.raises(KeyError, match="'c'"):
        writer.write("c", torch.zeros(2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
