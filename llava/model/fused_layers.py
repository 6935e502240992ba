"""The language model's attention with rotary embeddings in one pass over q and k (``--fused_rope``, on by default).

    from llava.model.fused_layers import use_fused_rope
    use_fused_rope(model)            # training forwards of Llama / Qwen2 / Mistral attention: RoPE in one pass
    use_fused_rope(model, False)     # the stock attention forward again (done before saving)

transformers' ``apply_rotary_pos_emb`` computes ``q * cos + rotate_half(q) * sin`` on the transposed
``[batch, heads, seq, head_dim]`` view: ``rotate_half`` builds a new tensor with ``cat((-x2, x1), dim=-1)`` (a copy
of 32-float pieces), and autograd takes it back apart in the backward pass (a zero tensor of the whole input per
slice, then a copy into it). On a CPU those passes over memory cost more than the attention projections of a small
model. :class:`RotaryFunction` writes each half of the result once, on the projection's own ``[batch, seq, heads,
head_dim]`` layout, and its backward is the same rotation by ``-sin``:

    out[:h] = x[:h] * cos[:h] - x[h:] * sin[:h]       grad[:h] = g[:h] * cos[:h] + g[h:] * sin[h:]
    out[h:] = x[h:] * cos[h:] + x[:h] * sin[h:]       grad[h:] = g[h:] * cos[h:] - g[:h] * sin[:h]

Each element is the stock expression's two products and one sum (``a - b == a + (-b)``), and each gradient element
the same two products that autograd adds, so logits, loss and gradients are bitwise the stock ones. The attention forward is replaced on the
instance for the training forward only (no cache, ``module.training``); eval, generation and every other forward
call the class's own ``forward``. Module names, weights and the saved checkpoint are unchanged. Only the attention
classes whose forward is written out here are touched (Llama, Qwen2, Mistral: projections, RoPE, the configured
attention function, ``o_proj``); any other is left stock. Held by ``tests/model/test_fused_layers.py``: bitwise equal logits, loss and
gradients for Llama, Qwen2 and Mistral, and for the Llava training step padded, packed and with LoRA.
"""

from __future__ import annotations

from types import MethodType

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# attention class -> the keyword arguments its stock forward adds to the attention call (read from the module)
_EXTRA_KWARGS = {
    "LlamaAttention": lambda module: {},
    "Qwen2Attention": lambda module: {"sliding_window": module.sliding_window},
    "MistralAttention": lambda module: {"sliding_window": getattr(module.config, "sliding_window", None)},
}


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """``x [b, s, heads, d]``, ``cos/sin [b, s, d]``: ``x * cos + rotate_half(x) * sin`` (``sign`` 1) or the
    transposed rotation (``sign`` -1), each half written once."""
    h = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty_like(x)
    first, second = out[..., :h], out[..., h:]
    if sign > 0:
        torch.mul(x1, cos[..., :h], out=first).sub_(x2 * sin[..., :h])
        torch.mul(x2, cos[..., h:], out=second).add_(x1 * sin[..., h:])
    else:
        torch.mul(x1, cos[..., :h], out=first).add_(x2 * sin[..., h:])
        torch.mul(x2, cos[..., h:], out=second).sub_(x1 * sin[..., :h])
    return out


class RotaryFunction(torch.autograd.Function):
    """RoPE on ``[batch, seq, heads, head_dim]`` (transformers' half-split layout); backward: the inverse rotation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad.contiguous(), cos, sin, -1.0), None, None


def _fused_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                             past_key_values=None, **kwargs):
    """The stock attention forward with :class:`RotaryFunction` on the projections' own layout (training only)."""
    cos_sin = position_embeddings
    # eager attention (no registered function) and every forward but training's: the class's own path
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
    if (attention is None or not self.training or past_key_values is not None or cos_sin is None
            or cos_sin[0].dim() != 3 or cos_sin[0].shape[-1] != self.head_dim):
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
    cos, sin = cos_sin
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = RotaryFunction.apply(self.q_proj(hidden_states).view(hidden_shape), cos, sin).transpose(1, 2)
    key = RotaryFunction.apply(self.k_proj(hidden_states).view(hidden_shape), cos, sin).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    out, weights = attention(self, query, key, value, attention_mask, dropout=self.attention_dropout,
                             scaling=self.scaling, **_EXTRA_KWARGS[type(self).__name__](self), **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def use_fused_rope(model, enable: bool = True) -> int:
    """Install (or remove) the fused-RoPE training forward on every attention module of ``model`` (a Llava model,
    PEFT-wrapped or not, or a bare language model) whose class is written out above; returns how many use it now.
    The vision tower's attention classes are not among them."""
    count = 0
    for module in model.modules():
        if type(module).__name__ not in _EXTRA_KWARGS:
            continue
        if enable:
            module.forward = MethodType(_fused_attention_forward, module)
            count += 1
        else:
            module.__dict__.pop("forward", None)
    return count
