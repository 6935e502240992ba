"""One forward for a preference batch: chosen and rejected rows together, each pair's images encoded once, and the
summed log-probabilities of each row's answer tokens from the LM head on the answer positions only.

    from llava.model.preference_forward import use_preference_forward, answer_logps
    use_preference_forward(model)                  # once (the policy; a frozen reference copy too)
    sums, counts = answer_logps(model, batch)      # batch: 2n rows (n chosen, then n rejected), images of n pairs

A preference batch (``llava/data/preference.py``'s collator) holds ``2n`` text rows, the chosen answers of ``n``
pairs then their rejected answers, but the images of the ``n`` pairs only. Two instance-level patches make the stock
``forward`` of a Llava / LlavaNext / LlavaOnevision model (PEFT-, DeepSpeed- or DDP-wrapped, unchanged) serve it:

- the inner model's ``get_image_features`` runs the tower and projector on the ``n`` pairs' images once and hands
  their features back twice (``pooler_output`` + itself: the chosen rows' image tokens come first in the batch, then
  the rejected rows', in pair order), so the model's own ``masked_scatter`` fills both rows of a pair from one
  encoding and the gradient of both rows flows into that one encoding;
- a video model's ``get_video_features`` (LlavaOnevision, LlavaNextVideo: the native video path the SFT forward
  runs) likewise encodes the ``n`` pairs' videos once (``pixel_values_videos``) and hands their features back twice;
- ``lm_head``'s forward, while :func:`answer_logps` runs, gathers the hidden states of the positions whose shifted
  label is supervised and returns each row's summed log p(answer token) (:class:`LinearTokenLogProbs`: a chunk of rows
  at a time, logits recomputed in backward, never all of them at once) instead of full-vocabulary logits.

Outside :func:`answer_logps` both patches pass through (full logits, one feature per image), so eval, generation and
``save_pretrained`` see the stock model. Held by ``tests/train/test_dpo.py`` (losses and every gradient against a
native per-row forward with full logits, <= 1e-6 fp32, for Llava, LlavaNext anyres and LlavaOnevision).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from llava.constants import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32): rows per chunk = CHUNK_ELEMENTS // vocab
_ATTR = "_llava_preference_forward"
BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes", "batch_num_images",
              "pixel_values_videos")


class LinearTokenLogProbs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[i, targets[i]]`` for every row ``i``, in chunks of rows.

    ``hidden`` ``[N, d]``, ``weight`` ``[V, d]``, ``bias`` ``[V]`` or None, ``targets`` ``[N]``; returns ``[N]`` fp32.
    Forward keeps only each row's log-sum-exp; backward recomputes a chunk's logits and turns them into
    ``grad_out * (one_hot - softmax)``, multiplied into the gradients of ``hidden``, ``weight`` and ``bias``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, compute_dtype: torch.dtype):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty_like(out)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = F.linear(hidden[rows].to(compute_dtype), w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse
                lse_all[rows] = lse
                del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.chunk_rows, ctx.compute_dtype = chunk_rows, compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cd = ctx.compute_dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cd)
            b = bias.to(cd) if bias is not None else None
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                h = hidden[rows].to(cd)
                y, g_out = targets[rows], grad_out[rows].float()
                grad = F.linear(h, w, b).float().sub_(lse_all[rows, None]).exp_()  # softmax
                grad.mul_(-g_out[:, None])
                grad[torch.arange(len(y), device=y.device), y] += g_out  # grad_out * (one_hot - softmax)
                if need_b:
                    grad_b += grad.sum(0)
                grad = grad.to(cd)
                if need_h:
                    grad_h[rows] = (grad @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (grad.t() @ h).float()
                del grad
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def summed_answer_logps(hidden_states: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor,
                        chunk_rows: int | None = None) -> torch.Tensor:
    """Each row's ``sum_t log p(labels[t+1] | ..t)`` over supervised positions: ``[B]`` fp32 (differentiable)."""
    targets = labels[..., 1:].to(hidden_states.device)
    supervised = targets != IGNORE_INDEX
    rows = hidden_states[..., :-1, :][supervised]
    row_of = torch.arange(labels.shape[0], device=hidden_states.device)[:, None].expand_as(targets)[supervised]
    vocab = lm_head.weight.shape[0]
    device_type = hidden_states.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else lm_head.weight.dtype)
    token_logps = LinearTokenLogProbs.apply(rows, lm_head.weight, lm_head.bias, targets[supervised],
                                            chunk_rows or max(1, CHUNK_ELEMENTS // vocab), compute_dtype)
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden_states.device).index_add(
        0, row_of, token_logps)


class _PairState:
    def __init__(self, chunk_rows: int | None):
        self.chunk_rows = chunk_rows
        self.labels: torch.Tensor | None = None  # set while answer_logps runs
        self.stock_head = True
        self.stock_image_features = None
        self.stock_video_features = None


def _head_forward(state: _PairState, head: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    if state.labels is None:
        return F.linear(hidden_states, head.weight, head.bias)
    return summed_answer_logps(hidden_states, head, state.labels, state.chunk_rows)


def _image_features_twice(state: _PairState, *args, **kwargs):
    out = state.stock_image_features(*args, **kwargs)
    if state.labels is not None:  # chosen rows' image tokens, then the rejected rows': the same features again
        features = list(out.pooler_output)
        out.pooler_output = features + features
    return out


def _video_features_twice(state: _PairState, *args, **kwargs):
    out = state.stock_video_features(*args, **kwargs)
    if state.labels is not None:  # [videos, tokens, d]: the chosen rows' videos, then the rejected rows' (the same)
        out.pooler_output = torch.cat([out.pooler_output, out.pooler_output])
    return out


def _llava(model: nn.Module) -> nn.Module:
    """The Llava-family model inside DDP / DeepSpeed engines and PEFT wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_preference_forward(model: nn.Module, enable: bool = True, *, chunk_rows: int | None = None) -> None:
    """Install (or remove) the two patches on the (possibly PEFT-wrapped) Llava-family model."""
    llava = _llava(model)
    state: _PairState | None = getattr(llava, _ATTR, None)
    if state is not None:
        if not state.stock_head:
            del llava.lm_head.forward
        del llava.model.get_image_features
        if state.stock_video_features is not None:
            del llava.model.get_video_features
        delattr(llava, _ATTR)
    if not enable:
        return
    state = _PairState(chunk_rows)
    if type(llava.lm_head) is nn.Linear:
        llava.lm_head.forward = partial(_head_forward, state, llava.lm_head)
        state.stock_head = False
    state.stock_image_features = llava.model.get_image_features
    llava.model.get_image_features = partial(_image_features_twice, state)
    if hasattr(llava.model, "get_video_features"):  # LlavaOnevision / LlavaNextVideo: the SFT forward's video path
        state.stock_video_features = llava.model.get_video_features
        llava.model.get_video_features = partial(_video_features_twice, state)
    setattr(llava, _ATTR, state)


def answer_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums [2n] fp32, counts [2n])``: each row's summed answer log-probs and its number of answer tokens, from
    one forward of the batch (``labels`` mark the answer tokens; the images are the ``n`` pairs')."""
    llava = _llava(model)
    state: _PairState = getattr(llava, _ATTR)
    labels = batch["labels"]
    counts = (labels[..., 1:] != IGNORE_INDEX).sum(-1)
    inputs = {k: batch[k] for k in BATCH_KEYS if batch.get(k) is not None}
    state.labels = labels
    try:
        out = model(**inputs, use_cache=False)
    finally:
        state.labels = None
    if state.stock_head:  # a wrapped lm_head (LoRA on it, quantized): full logits, log-softmax
        logits = out.logits[:, :-1].float()
        targets = labels[:, 1:].to(logits.device)
        mask = targets != IGNORE_INDEX
        token = logits.log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
        return (token * mask).sum(-1), counts
    return out.logits, counts
