"""LM head and cross-entropy only where the loss is: supervised positions, in chunks, no full-vocabulary logits.

    from llava.model.supervised_head import use_supervised_head
    use_supervised_head(model)          # training forwards with labels: loss from the supervised positions only
    use_supervised_head(model, False)   # the stock head again (full logits, transformers' ForCausalLMLoss)

In LLaVA SFT only assistant replies are supervised, yet the stock ``LlavaForConditionalGeneration.forward`` runs
``lm_head`` over every position and keeps full-vocabulary fp32 logits, their log-softmax and their gradient (for 4 x
2048 tokens at a 152K vocabulary, ~5 GB each). Here the hidden states of the positions whose *shifted* label is
supervised are gathered, and a fused linear + cross-entropy (:class:`LinearCrossEntropy`) runs on them a chunk of
rows at a time: each chunk's logits are made, reduced to the loss, turned into their gradient in place (softmax minus
one-hot), multiplied into the gradients of the hidden states and the weight, and dropped. Peak head memory is one
chunk of logits plus a weight-sized fp32 gradient accumulator; the backward pass only scales the stored gradients.

How it hooks in, so that every wrapper (PEFT, DeepSpeed ZeRO-3, DDP) still runs the stock forward: a forward
pre-hook on the Llava model notes ``labels`` and ``num_items_in_batch`` of a training call; the ``lm_head``'s forward
(replaced on the instance: module names, weights and state dict unchanged; ZeRO-3's gather hooks still wrap it)
returns the loss instead of logits for that call; the model's ``loss_function`` hands that loss through. The loss is
the stock one: per-token cross-entropy in fp32 of ``logits[:, :-1]`` against ``labels[:, 1:]`` with ``-100``
ignored, summed and divided by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation), else the
mean over supervised tokens. ``outputs.logits`` of such a call holds the loss (0-dim); eval, predict and generation
(``model.eval()``, or no labels) take the stock path and get full logits. Held by ``tests/model/test_supervised_head.py``
(loss and every gradient vs the stock head, <= 1e-5 fp32: padding, packing, accumulation, LoRA, ZeRO-3).

Plain torch on every device. liger-kernel's fused linear cross-entropy (a Triton kernel of the same idea) is not
used: it needs a CUDA GPU, and none was available to test it (no code path for it exists here).

Computed in the dtype the stock head would use (the weight's, or autocast's), logits upcast to fp32 as
``ForCausalLMLoss`` does; the weight gradient accumulates over chunks in fp32. Not used (stock path, logged) when
``lm_head`` is not a plain ``nn.Linear`` (a LoRA- or quantization-wrapped head).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from llava.constants import IGNORE_INDEX

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32): rows per chunk = CHUNK_ELEMENTS // vocab
_ATTR = "_llava_supervised_head"


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden[i] @ weight.T + bias, targets[i])`` with its gradients computed chunk by chunk in forward.

    ``hidden`` ``[N, d]``, ``weight`` ``[V, d]``, ``bias`` ``[V]`` or None, ``targets`` ``[N]`` (all supervised);
    ``compute_dtype`` is the matmul dtype (logits are upcast to fp32 for the softmax). Returns a 0-dim fp32 sum."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, compute_dtype: torch.dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        device_type = hidden.device.type
        with torch.autocast(device_type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start : start + chunk_rows].to(compute_dtype)
                y = targets[start : start + chunk_rows]
                logits = F.linear(h, w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(y), device=y.device), y] -= 1.0
                if need_b:
                    grad_b += grad.sum(0)
                grad = grad.to(compute_dtype)
                if need_h:
                    grad_h[start : start + chunk_rows] = (grad @ w).to(hidden.dtype)
                if need_w:
                    if compute_dtype == torch.float32:
                        grad_w.addmm_(grad.t(), h)
                    else:
                        grad_w += (grad.t() @ h).float()
                del logits, grad
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        stored = iter(ctx.saved_tensors)
        grad_h, grad_w, grad_b = (next(stored) if present else None for present in ctx.present)
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = (grad_b * grad_out).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None


def supervised_head_loss(hidden_states: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor,
                         num_items_in_batch: torch.Tensor | int | None = None,
                         chunk_rows: int | None = None, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The stock causal-LM loss of ``lm_head(hidden_states)`` against ``labels``, computed on supervised rows only.

    ``hidden_states`` ``[B, T, d]``, ``labels`` ``[B, T]`` (unshifted, ``-100`` ignored), or ``shift_labels``
    ``[B, T]`` already shifted (position t is trained on it; sequence parallelism's slices). Divided by
    ``num_items_in_batch`` when given, else by the number of supervised tokens (the mean)."""
    if shift_labels is not None:
        targets = shift_labels.to(hidden_states.device)
        supervised = targets != IGNORE_INDEX
        rows = hidden_states[supervised]
    else:
        targets = labels[..., 1:].to(hidden_states.device)
        supervised = targets != IGNORE_INDEX
        rows = hidden_states[..., :-1, :][supervised]
    vocab = lm_head.weight.shape[0]
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)
    device_type = hidden_states.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else lm_head.weight.dtype)
    total = LinearCrossEntropy.apply(rows, lm_head.weight, lm_head.bias, targets[supervised], chunk_rows,
                                     compute_dtype)
    if num_items_in_batch is None:
        return total / supervised.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _HeadState:
    """What the pre-hook noted for the next ``lm_head`` call, and the loss that call produced."""

    def __init__(self, chunk_rows: int | None):
        self.chunk_rows = chunk_rows
        self.pending: tuple[torch.Tensor, torch.Tensor | int | None, torch.Tensor | None] | None = None
        self.loss: torch.Tensor | None = None
        self.handle = None
        self.stock_loss_function = None
        self.had_own_loss_function = False


def _note_labels(state: _HeadState, module, args, kwargs):
    labels = kwargs.get("labels")
    exact = not kwargs.get("logits_to_keep")
    state.pending = (labels, kwargs.get("num_items_in_batch"), kwargs.get("shift_labels")) \
        if module.training and labels is not None and exact else None
    state.loss = None


def _head_forward(state: _HeadState, head: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    if state.pending is None:
        return F.linear(hidden_states, head.weight, head.bias)
    labels, num_items, shift_labels = state.pending
    state.pending = None
    state.loss = supervised_head_loss(hidden_states, head, labels, num_items, state.chunk_rows, shift_labels)
    return state.loss


def _loss_passthrough(state: _HeadState, logits=None, labels=None, **kwargs):
    if state.loss is not None and logits.dim() == 0:  # this call's head loss (ZeRO-3's output hooks may re-wrap it)
        state.loss = None
        return logits
    return state.stock_loss_function(logits=logits, labels=labels, **kwargs)


def use_supervised_head(model: nn.Module, enable: bool = True, *, chunk_rows: int | None = None) -> bool:
    """Switch the (possibly PEFT-wrapped) Llava model's training loss to the supervised-rows head, or back.
    Returns whether it is on (off when ``lm_head`` is not a plain ``nn.Linear``)."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = llava.lm_head
    state: _HeadState | None = getattr(llava, _ATTR, None)
    if state is not None:  # undo first
        state.handle.remove()
        del head.forward
        if state.had_own_loss_function:
            llava.loss_function = state.stock_loss_function
        else:
            del llava._loss_function
        delattr(llava, _ATTR)
    if not enable:
        return False
    if type(head) is not nn.Linear:
        logger.warning("lm_head is a %s, not a plain nn.Linear: the stock head and loss are used", type(head).__name__)
        return False
    state = _HeadState(chunk_rows)
    state.stock_loss_function = llava.loss_function
    state.had_own_loss_function = "_loss_function" in llava.__dict__
    state.handle = llava.register_forward_pre_hook(partial(_note_labels, state), with_kwargs=True)
    head.forward = partial(_head_forward, state, head)
    llava.loss_function = partial(_loss_passthrough, state)
    setattr(llava, _ATTR, state)
    return True
