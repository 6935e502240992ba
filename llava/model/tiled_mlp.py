"""Tiled MLP for long samples: the language model's MLP runs a slice of the sequence at a time (``--tiled_mlp``).

    from llava.model.tiled_mlp import use_tiled_mlp
    use_tiled_mlp(model, shards=4)    # every decoder layer's MLP: 4 slices of rows, recomputed slice by slice
    use_tiled_mlp(model, 0)           # the stock MLP again

A decoder MLP's intermediate activations (``gate``, ``up``, their product: ``3 x T x intermediate_size``) are the
largest tensors of a long sample -- for a 7B Llama, 11008 / 4096 = 2.7x the hidden states, three times over, kept
for the backward pass. The MLP acts on every position alone, so the sequence can be cut into slices: the forward
pass runs each slice without keeping its activations (``torch.no_grad``), and the backward pass runs each slice
again with grad and back-propagates it at once (:class:`TiledMLPFunction`). Peak MLP memory is one slice's
activations; the cost is one more MLP forward per step. This is the algorithm of DeepSpeed's ``TiledMLP`` (Arctic
long-sequence training, ``deepspeed.runtime.sequence_parallel.ulysses_sp``), written here so that the model package
needs no DeepSpeed import; like it, it marks the weights ``ds_grad_is_ready`` only on the last slice, so ZeRO adds a
weight's gradient to its bucket once. The tiled loss is the supervised head (``llava/model/supervised_head.py``):
its fused linear + cross-entropy already runs on supervised rows a chunk at a time (``--supervised_head_chunk_rows``
sets the chunk).

The MLP forward is replaced on the instance (module names, weights and ``state_dict`` unchanged; the saved model is
the native one). Each row's result is the same computation as untiled, so the loss and the gradients equal the
stock MLP's up to float summation order of the weight gradients over slices (held by
``tests/model/test_tiled_mlp.py``: <= 1e-6 fp32, and the peak memory of a long sample falls).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

_ATTR = "_llava_tiled_mlp"


class TiledMLPFunction(torch.autograd.Function):
    """``mlp(x)`` computed ``shards`` slices of rows at a time; activations recomputed per slice in backward."""

    @staticmethod
    def forward(ctx, mlp: nn.Module, x: torch.Tensor, shards: int, *params: torch.Tensor) -> torch.Tensor:
        ctx.mlp, ctx.shards = mlp, shards
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([type(mlp).forward(mlp, s) for s in x.reshape(-1, x.shape[-1]).chunk(shards)]
                             ).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        mlp, shards = ctx.mlp, ctx.shards
        flat = x.detach().reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if ctx.needs_input_grad[1] else None
        trainable = [p for p in mlp.parameters() if p.requires_grad]
        xs, gs = flat.chunk(shards), grad_flat.chunk(shards)
        offset = 0
        for i, (xs_i, gs_i) in enumerate(zip(xs, gs)):
            for p in trainable:  # DeepSpeed ZeRO: take a weight's gradient into its bucket after the last slice only
                p.ds_grad_is_ready = i == len(xs) - 1
            xs_i = xs_i.detach().requires_grad_(grad_x is not None)
            with torch.enable_grad():
                out = type(mlp).forward(mlp, xs_i)
            inputs = ([xs_i] if grad_x is not None else []) + trainable
            if inputs:  # weight gradients accumulate through their own AccumulateGrad (hooks of ZeRO / DDP fire)
                torch.autograd.backward(out, gs_i, inputs=inputs)
            if grad_x is not None:
                grad_x[offset : offset + len(xs_i)] = xs_i.grad
            offset += len(xs_i)
        return (None, None if grad_x is None else grad_x.view_as(x), None) + (None,) * (len(ctx.needs_input_grad) - 3)


def _tiled_forward(mlp: nn.Module, shards: int, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or x.shape[:-1].numel() < 2 * shards:
        return type(mlp).forward(mlp, x)
    return TiledMLPFunction.apply(mlp, x, shards, *(p for p in mlp.parameters() if p.requires_grad))


def decoder_mlps(model) -> list[nn.Module]:
    """The MLP module of every decoder layer of the (possibly PEFT-wrapped) Llava model's language model."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [layer.mlp for layer in llava.model.language_model.layers]


def use_tiled_mlp(model, shards: int = 4) -> int:
    """Tile every decoder MLP of the model into ``shards`` slices (``0`` or ``1``: the stock MLP). Returns the
    number of MLPs tiled."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    for mlp in llava.__dict__.pop(_ATTR, ()):
        mlp.__dict__.pop("forward", None)
    if shards <= 1:
        return 0
    mlps = decoder_mlps(llava)
    for mlp in mlps:
        mlp.forward = partial(_tiled_forward, mlp, shards)
    llava.__dict__[_ATTR] = mlps
    return len(mlps)
