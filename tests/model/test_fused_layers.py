"""Fused RoPE (``llava/model/fused_layers.py``, ``--fused_rope``) against transformers' own attention forward.

    .venv/bin/python -m pytest -q tests/model/test_fused_layers.py

The reference is the same module with the stock forward (``use_fused_rope(model, False)``): transformers'
``apply_rotary_pos_emb``. Logits, loss and every gradient are held bitwise: each element is the same two products and
one sum as the stock forward and as autograd's backward (float addition commutes). A spy shows the fused path really
ran, and eval / generation forwards keep the stock one.
"""

from __future__ import annotations

import pytest
import torch
from test_causal_padding import _trainer  # the tiny Llava trainer of the shapes data, batch 4
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llava.model import fused_layers
from llava.model.fused_layers import RotaryFunction, use_fused_rope


@pytest.mark.parametrize("shape", [(2, 7, 3, 8), (1, 33, 4, 64)])
def test_rotary_function_equals_apply_rotary_pos_emb(shape):
    """Any cos/sin (the two halves differ here, so no rope-type assumption is made), a non-trivial upstream grad."""
    torch.manual_seed(0)
    b, s, h, d = shape
    x = torch.randn(b, s, h, d, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(b, s, d, dtype=torch.float64), torch.randn(b, s, d, dtype=torch.float64)
    grad = torch.randn(b, h, s, d, dtype=torch.float64)
    stock, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    (stock_grad,) = torch.autograd.grad(stock, x, grad)
    fused = RotaryFunction.apply(x, cos, sin).transpose(1, 2)
    (fused_grad,) = torch.autograd.grad(fused, x, grad)
    assert torch.equal(fused, stock)
    assert torch.equal(fused_grad, stock_grad)
    # the backward is the inverse rotation for a true rope (cos^2 + sin^2 = 1 per half): rotate then un-rotate
    angle = torch.rand(b, s, d // 2, dtype=torch.float64) * 6
    c, s_ = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    y = RotaryFunction.apply(x, c, s_)
    (back,) = torch.autograd.grad(y, x, y.detach())  # R^T R x = x
    torch.testing.assert_close(back, x.detach(), rtol=0, atol=1e-12)


def _lm(kind: str):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    return MistralForCausalLM(MistralConfig(**common, sliding_window=4096))


def _loss_grads(model, ids, positions):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)  # training: no cache
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_language_model_training_forward_equals_stock(kind, monkeypatch):
    model = _lm(kind).train()
    ids = torch.randint(0, 97, (2, 40))
    positions = torch.cat([torch.arange(25), torch.arange(15)])[None].expand(2, -1)  # two samples per row
    logits_stock, grads_stock = _loss_grads(model, ids, positions)
    calls = []
    real = RotaryFunction.apply
    monkeypatch.setattr(RotaryFunction, "apply", lambda *a: calls.append(1) or real(*a))
    assert use_fused_rope(model) == 2
    logits, grads = _loss_grads(model, ids, positions)
    assert len(calls) == 4  # q and k of both layers went through the fused path
    assert torch.equal(logits, logits_stock)
    assert grads.keys() == grads_stock.keys()
    assert all(torch.equal(grads[name], grad) for name, grad in grads_stock.items())
    model.eval()  # eval and generation: the class's own forward
    calls.clear()
    with torch.no_grad():
        model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert not calls
    assert use_fused_rope(model, False) == 0 and "forward" not in model.model.layers[0].self_attn.__dict__


def test_eager_attention_keeps_the_stock_forward(monkeypatch):
    """No attention function is registered for eager: the class's own forward runs (RoPE included), nothing fused."""
    model = _lm("llama")
    model.config._attn_implementation = "eager"
    model.train()
    ids = torch.randint(0, 97, (1, 20))
    stock, _ = _loss_grads(model, ids, torch.arange(20)[None])
    calls = []
    real = RotaryFunction.apply
    monkeypatch.setattr(RotaryFunction, "apply", lambda *a: calls.append(1) or real(*a))
    use_fused_rope(model)
    logits, _ = _loss_grads(model, ids, torch.arange(20)[None])
    assert not calls and torch.equal(logits, stock)


@pytest.mark.parametrize("flags", [[], ["--packing", "True"], ["--lora_enable", "True", "--lora_r", "4"]],
                         ids=["padded", "packed", "lora"])
def test_llava_training_step_equals_stock_rope(tiny_models, shapes_data, tmp_path, flags):
    trainer = _trainer(tiny_models, shapes_data, tmp_path, *flags)
    model = trainer.model
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero adapters, so gradient flows through them
            torch.nn.init.normal_(p, std=0.1)
    batch = next(iter(trainer.get_train_dataloader()))
    fused_forwards = [m for m in model.modules() if "forward" in m.__dict__ and
                      getattr(m.__dict__["forward"], "__func__", None) is fused_layers._fused_attention_forward]
    assert fused_forwards  # on by default

    def step():
        model.train()
        model.zero_grad(set_to_none=True)
        loss = float(trainer.training_step(model, dict(batch)))
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    use_fused_rope(model, False)
    loss_stock, grads_stock = step()
    assert loss == loss_stock
    assert grads.keys() == grads_stock.keys() and grads
    assert [name for name, grad in grads_stock.items() if not torch.equal(grads[name], grad)] == []
