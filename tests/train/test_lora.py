"""LoRA / QLoRA setup: which layers get adapters, which biases train and are saved, which layers are quantized.

Expectations come from the tiny models' configs (layer counts, module names written out here), never from
``llava.train.lora`` itself.

    .venv/bin/pytest tests/train/test_lora.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llava.model.builder import apply_freezing, build_llava_model
from llava.model.quantization import quantization_config
from llava.run_dir import NON_LORA_FILE
from llava.train.args import ModelArguments, TrainingArguments
from llava.train.lora import find_all_linear_names, save_lora_checkpoint, setup_lora

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def expected_linears(num_layers: int) -> list[str]:
    return sorted(f"model.language_model.layers.{i}.{sub}" for i in range(num_layers) for sub in LLAMA_LINEARS)


def lora_args(**kw):
    base = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_bias": "none", "bits": 16,
            "double_quant": True, "quant_type": "nf4"}
    return SimpleNamespace(**{**base, **kw})


def build(tiny_models, llm=None, **kw):
    args = ModelArguments(model_name_or_path=str(llm or tiny_models["llm"]), vision_tower=str(tiny_models["vision_tower"]))
    built = build_llava_model(args, **kw)
    apply_freezing(built.model, args, added_tokens=built.added_tokens)
    return args, built


@pytest.fixture(scope="module")
def llm_with_biases(tiny_models, tmp_path_factory):
    """The tiny Llama with attention and MLP biases, so the bias modes have something to differ on."""
    out = tmp_path_factory.mktemp("llama-bias")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llm"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_find_all_linear_names_is_every_lm_linear(tiny_models):
    _, built = build(tiny_models)
    num_layers = built.model.config.text_config.num_hidden_layers
    assert find_all_linear_names(built.model) == expected_linears(num_layers)
    # the model does have linears elsewhere: the vision tower, the projector and lm_head
    others = [n for n, m in built.model.named_modules() if isinstance(m, nn.Linear)
              and not n.startswith("model.language_model.")]
    assert "lm_head" in others and "model.multi_modal_projector.linear_1" in others
    assert any(n.startswith("model.vision_tower.") for n in others)
    excluded = find_all_linear_names(built.model, exclude=("mlp.",))
    assert excluded == [n for n in expected_linears(num_layers) if ".mlp." not in n]


@pytest.mark.parametrize("mode", ["none", "all", "lora_only"])
def test_lora_bias_modes_train_and_save_the_right_biases(tiny_models, llm_with_biases, tmp_path, mode):
    args, built = build(tiny_models, llm=llm_with_biases)
    model = setup_lora(built.model, args, lora_args(lora_bias=mode), added_tokens=built.added_tokens,
                       exclude=("mlp.down_proj",))
    wrapped = [n for n in expected_linears(2) if not n.endswith("down_proj")]
    lm_biases = {f"{n}.base_layer.bias" for n in wrapped} | {f"model.language_model.layers.{i}.mlp.down_proj.bias"
                                                              for i in range(2)}
    expected_bias = {"none": set(), "all": lm_biases, "lora_only": {f"{n}.base_layer.bias" for n in wrapped}}[mode]
    trainable = {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}
    lora = {f"{n}.lora_{ab}.default.weight" for n in wrapped for ab in "AB"}
    full = {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
            "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias",
            "model.language_model.embed_tokens.weight", "lm_head.weight"}
    assert built.added_tokens > 0  # <image> was added, so the embeddings train
    assert trainable == lora | full | expected_bias
    # saved: adapter = LoRA matrices + the mode's biases; beside it the projector and embeddings
    save_lora_checkpoint(model, tmp_path)
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    strip = {k.removeprefix("base_model.model.") for k in adapter}
    assert strip == {k.replace(".default", "") for k in lora} | expected_bias
    assert set(load_file(tmp_path / NON_LORA_FILE)) == full
    assert all(v.numel() > 0 for v in adapter.values())


def test_bad_lora_flags_fail_at_startup(tmp_path):
    base = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none"}
    with pytest.raises(ValueError, match="--lora_bias"):
        TrainingArguments(**base, lora_enable=True, lora_bias="some")
    with pytest.raises(ValueError, match="--bits"):
        TrainingArguments(**base, lora_enable=True, bits=3)
    with pytest.raises(ValueError, match="--lora_enable"):
        TrainingArguments(**base, bits=4)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_quantizes_only_the_lm_linears(tiny_models, bits):
    bnb = pytest.importorskip("bitsandbytes")
    qconfig = quantization_config(lora_args(bits=bits), torch.float32)
    args, built = build(tiny_models, quantization_config=qconfig)
    quant_cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantized = sorted(n for n, m in built.model.named_modules() if isinstance(m, quant_cls))
    assert quantized == expected_linears(built.model.config.text_config.num_hidden_layers)
    plain = [n for n, m in built.model.named_modules() if type(m) is nn.Linear]
    assert "lm_head" in plain and "model.multi_modal_projector.linear_2" in plain
    assert sum(n.startswith("model.vision_tower.") for n in plain) == sum(
        isinstance(m, nn.Linear) for m in built.model.model.vision_tower.modules())
    if bits == 8:
        return
    # LoRA on the 4-bit layers: a forward/backward reaches the adapters and the projector
    model = setup_lora(built.model, args, lora_args(bits=4), added_tokens=built.added_tokens)
    ids = torch.tensor([[1, 5, 6, 7]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
