"""Tiled MLP + tiled (supervised-head) loss: the same loss and gradients as the stock MLP and head.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/model/test_tiled_mlp.py

References: the stock ``LlamaMLP`` forward/backward on the same input (unit), and the stock Llava forward (untiled
MLPs, the stock LM head over every position, transformers' loss) for the whole model, padded and packed, with and
without gradient checkpointing; a memory check that the slices really bound the MLP's saved activations.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from llava.data.collator import DataCollatorForSupervisedDataset, DataCollatorWithPacking
from llava.model.supervised_head import use_supervised_head
from llava.model.tiled_mlp import TiledMLPFunction, decoder_mlps, use_tiled_mlp
from tests.train.test_packing import built, samples  # noqa: F401  (module fixtures: tiny Llava, 3 samples)


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_tiled_mlp_equals_stock_mlp_output_and_gradients(shards):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2))
    x = torch.randn(2, 23, 16, requires_grad=True)
    g = torch.randn(2, 23, 16)
    out = mlp(x)
    out.backward(g)
    ref = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad()
    tiled = TiledMLPFunction.apply(mlp, x, shards, *mlp.parameters())
    torch.testing.assert_close(tiled, out, rtol=0, atol=1e-6)
    tiled.backward(g)
    got = [x.grad] + [p.grad for p in mlp.parameters()]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # frozen input (no grad for x) with trainable weights: the weights still get theirs
    mlp.zero_grad()
    TiledMLPFunction.apply(mlp, x.detach(), shards, *mlp.parameters()).backward(g)
    for p, r in zip(mlp.parameters(), ref[1:]):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


def test_tiled_mlp_saves_one_slice_of_activations():
    """What autograd keeps for the backward pass: the stock MLP saves its intermediate activations (several
    ``T x intermediate`` tensors), the tiled one only its input."""
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=64, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2))
    x = torch.randn(1, 512, 16, requires_grad=True)

    def saved_elements(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return sum(sizes)

    stock = saved_elements(lambda: mlp(x))
    tiled = saved_elements(lambda: TiledMLPFunction.apply(mlp, x, 8, *mlp.parameters()))
    assert stock >= 3 * 512 * 64 and tiled == 512 * 16


@pytest.mark.parametrize(("packing", "checkpointing"), [(False, False), (True, True)])
def test_tiled_model_loss_and_grads_equal_stock(built, samples, packing, checkpointing):  # noqa: F811
    model = built.model.train()
    pad = built.tokenizer.pad_token_id
    collate = DataCollatorWithPacking(pad_token_id=pad) if packing else DataCollatorForSupervisedDataset(pad_token_id=pad)
    batch = collate(samples)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in params if p.grad is not None}

    try:
        ref_loss, ref = loss_and_grads()
        assert use_tiled_mlp(model, 3) == len(decoder_mlps(model)) > 0
        assert use_supervised_head(model, chunk_rows=5)  # the tiled loss: 5 supervised rows per logits tile
        loss, got = loss_and_grads()
        assert got.keys() == ref.keys() and any("mlp" in n for n in got)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)
        use_tiled_mlp(model, 0)
        assert all("forward" not in mlp.__dict__ for mlp in decoder_mlps(model))
    finally:
        use_tiled_mlp(model, 0)
        use_supervised_head(model, False)
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.zero_grad()


def test_train_flags_tiled_step_equals_stock_step(tiny_models, shapes_data, tmp_path):
    """``--tiled_mlp_shards 3 --supervised_head_chunk_rows 4`` through the trainer: one SGD step trains the same
    weights as the untiled run."""
    from tests.train.test_packing import _trainer

    flags = ("--per_device_train_batch_size", "4", "--packing", "True")
    stock = _trainer(tiny_models, shapes_data, tmp_path / "a", *flags)
    stock.train()
    tiled = _trainer(tiny_models, shapes_data, tmp_path / "b", *flags, "--tiled_mlp_shards", "3",
                     "--supervised_head_chunk_rows", "4")
    assert "forward" in decoder_mlps(tiled.model)[0].__dict__  # tiled on
    tiled.train()
    ref = dict(stock.model.named_parameters())
    changed = [n for n, p in tiled.model.named_parameters() if p.requires_grad]
    assert any("mlp" in n for n in changed)
    for n in changed:
        torch.testing.assert_close(dict(tiled.model.named_parameters())[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="--supervised_head_chunk_rows needs --supervised_head True"):
        _trainer(tiny_models, shapes_data, tmp_path / "c", "--supervised_head", "False",
                 "--supervised_head_chunk_rows", "4")
