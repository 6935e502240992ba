"""LoRA / QLoRA runs on the tiny shapes data, then ``llava merge``: outputs, logits after a plain reload, dtypes.

The merged checkpoint is reloaded with ``LlavaForConditionalGeneration.from_pretrained`` alone and compared with
the live adapter model the trainer finished with (a computation that never went through ``llava.export``).

    .venv/bin/pytest tests/export/test_merge.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava.cli import main as cli_main
from llava.export.merge import merge_lora
from llava.run_dir import RunKind, run_kind
from llava.train.train import train

STEPS = 4


def lora_argv(tiny_models, shapes_data, out, *extra) -> list[str]:
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(shapes_data["stage2_qa"]),
            "--image_folder", str(shapes_data["image_folder"]), "--output_dir", str(out),
            "--per_device_train_batch_size", "8", "--max_steps", str(STEPS), "--learning_rate", "1e-2",
            "--logging_steps", "1", "--save_steps", "2", "--report_to", "none", "--model_max_length", "256",
            "--use_cpu", "True", "--seed", "0", "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
            "--lora_dropout", "0.0", "--mm_projector_lr", "2e-3", *extra]


def scan_safetensors(directory: Path) -> int:
    """Every tensor in every safetensors file under ``directory`` is non-empty; returns the number of files."""
    files = list(directory.rglob("*.safetensors"))
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                assert f.get_slice(key).get_shape() and all(f.get_slice(key).get_shape()), (path, key)
                assert f.get_tensor(key).numel() > 0, (path, key)
    return len(files)


def batch_of(trainer, n: int = 4) -> dict:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


@pytest.fixture(scope="module")
def lora_run(tiny_models, shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return {"dir": out, "trainer": train(lora_argv(tiny_models, shapes_data, out))}


@pytest.fixture(scope="module")
def qlora_run(tiny_models, shapes_data, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("qlora")
    return {"dir": out, "trainer": train(lora_argv(tiny_models, shapes_data, out, "--bits", "4"))}


def test_lora_run_writes_adapter_trainables_and_args(lora_run, tiny_models):
    out, trainer = lora_run["dir"], lora_run["trainer"]
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
            "llava_args.json", "tokenizer.json", "processor_config.json"} <= names, names
    assert "model.safetensors" not in names
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # --lora_bias none
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 1e-3  # trained away from 0
    live = trainer.model.get_base_model()
    non_lora = load_file(out / "non_lora_trainables.safetensors")
    live_params = dict(live.named_parameters())
    assert set(non_lora) == {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
                             "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias",
                             "model.language_model.embed_tokens.weight", "lm_head.weight"}
    for key, value in non_lora.items():
        torch.testing.assert_close(value, live_params[key].detach(), rtol=0, atol=0)
    args = json.loads((out / "llava_args.json").read_text())
    assert args["model_args"]["model_name_or_path"] == str(tiny_models["llm"])
    assert args["model_args"]["vision_tower"] == str(tiny_models["vision_tower"])
    assert args["training_args"]["lora_enable"] is True and args["training_args"]["lora_r"] == 8
    assert args["training_args"]["bits"] == 16
    assert run_kind(out) is RunKind.LORA and run_kind(out / "checkpoint-2") is RunKind.LORA
    # the projector trained at its own learning rate
    projector = {id(p) for p in live.model.multi_modal_projector.parameters()}
    lrs = {g["initial_lr"] for g in trainer.optimizer.param_groups if {id(p) for p in g["params"]} <= projector}
    assert lrs == {2e-3}


def test_merged_checkpoint_reloads_with_adapter_logits(lora_run, tmp_path):
    trainer = lora_run["trainer"]
    peft_model = trainer.model.eval()
    inputs = batch_of(trainer)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            without = peft_model(**inputs).logits
    assert (expected - without).abs().max() > 1e-3  # the adapter matters, so the comparison below can fail
    out = merge_lora(lora_run["dir"], tmp_path / "merged", max_shard_size="1MB")
    assert (out / "model.safetensors.index.json").is_file()  # sharded
    merged = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == merged.config.image_token_id
    assert json.loads((out / "llava_args.json").read_text())["merged_from"] == str(lora_run["dir"])
    assert run_kind(out) is RunKind.MERGED
    assert scan_safetensors(out) >= 2 and scan_safetensors(lora_run["dir"]) >= 2


def test_merge_cli_bfloat16(lora_run, tmp_path):
    assert cli_main(["merge", "--adapter", str(lora_run["dir"]), "--out", str(tmp_path / "bf16"),
                     "--dtype", "bfloat16"]) == 0
    state = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]


def test_lora_resume_matches_uninterrupted(lora_run, tiny_models, shapes_data, tmp_path):
    """Resuming from checkpoint-2 restores the adapter and the non-LoRA trainables (projector, embeddings)."""
    assert {"adapter_model.safetensors", "non_lora_trainables.safetensors"} <= {
        p.name for p in (lora_run["dir"] / "checkpoint-2").iterdir()}
    out = tmp_path / "run"
    shutil.copytree(lora_run["dir"] / "checkpoint-2", out / "checkpoint-2")
    trainer = train(lora_argv(tiny_models, shapes_data, out, "--resume_from_checkpoint", str(out / "checkpoint-2")))
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    expected = {e["step"]: e["loss"] for e in lora_run["trainer"].state.log_history if "loss" in e}
    for step in (3, 4):
        assert losses[step] == pytest.approx(expected[step], abs=1e-5), step
    final, reference = load_file(out / "non_lora_trainables.safetensors"), load_file(
        lora_run["dir"] / "non_lora_trainables.safetensors")
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6)


def test_qlora_run_merges_to_the_dequantized_adapter_model(qlora_run, tmp_path):
    trainer = qlora_run["trainer"]
    assert json.loads((qlora_run["dir"] / "llava_args.json").read_text())["training_args"]["bits"] == 4
    assert run_kind(qlora_run["dir"]) is RunKind.QLORA
    inputs = batch_of(trainer)
    model = trainer.model.eval()
    # bitsandbytes computes an eval-mode Linear4bit on a CPU with AVX512-BF16 through a repacked bfloat16 kernel
    # (relative error ~4e-3 against its own dequantized weights); in train mode it dequantizes to float32 and
    # multiplies, as training did. Keep the 4-bit layers on that path (they have no dropout; LoRA's stays off).
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.train()
    with torch.no_grad():
        expected = model(**inputs).logits  # 4-bit base + adapter, as trained
        with trainer.model.disable_adapter():
            assert (trainer.model(**inputs).logits - expected).abs().max() > 1e-3  # the adapter matters
    out = merge_lora(qlora_run["dir"], tmp_path / "merged")
    merged = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(**inputs).logits
    # The same dequantized weights: bitsandbytes' CPU 4-bit matmul dequantizes to float32 and multiplies, so only
    # the order of float32 operations differs (x@W^T + s*(x@A^T)@B^T vs x@(W+sBA)^T); measured max 1.2e-6. Merging
    # into the unquantized base instead would be off by the whole 4-bit quantization error.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert scan_safetensors(out) >= 1 and scan_safetensors(qlora_run["dir"]) >= 2


def test_streamed_merge_equals_in_memory_merge(lora_run, tmp_path):
    """The shard-by-shard merge (default) writes the same tensors as peft's merge_and_unload of the whole model."""
    streamed = merge_lora(lora_run["dir"], tmp_path / "streamed", max_shard_size="200KB")
    in_memory = merge_lora(lora_run["dir"], tmp_path / "in_memory", streaming=False)
    assert len(json.loads((streamed / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    a = LlavaForConditionalGeneration.from_pretrained(streamed).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(in_memory).state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert json.loads((streamed / "config.json").read_text())["text_config"]["vocab_size"] == a[
        "model.language_model.embed_tokens.weight"].shape[0]
