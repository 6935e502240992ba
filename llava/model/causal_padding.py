"""Right-padded training batches without the padding mask: causal attention alone already hides the pads.

    from llava.model.causal_padding import use_causal_padding
    use_causal_padding(model)          # training forwards of right-padded batches drop ``attention_mask`` (sdpa)
    use_causal_padding(model, False)   # the stock masked attention again

``DataCollatorForSupervisedDataset`` pads on the right, so in every row the pad positions come after all the real
ones: under causal attention a real token never sees a pad key, whether or not a padding mask is passed. The mask
only changes what the *pad* positions compute, and those never reach the loss (their labels are ``-100``, and no
real position attends to them), so the loss and every gradient are the same with and without it. Without it,
transformers' ``sdpa`` path calls ``scaled_dot_product_attention(is_causal=True)`` with grouped-query heads
(``enable_gqa``) instead of a dense ``[B, 1, T, T]`` mask over key/value heads copied ``n_rep`` times
(``repeat_kv``, and the sum of those copies in the backward pass); the 4-D mask is not built either.

Applied only where that holds, checked on every call: the model is training, no KV cache, ``labels`` given and
``-100`` at every padded position, the 2-D mask is ones then zeros in every row (right padding), and the language
model's attention is ``sdpa`` (or ``llava_packed_sdpa``, which takes the same path for unpacked batches).
``flash_attention_2`` keeps its mask (it unpads, which does less work than attending over the pads); eval, predict
and generation are untouched. How it hooks in: a forward pre-hook with kwargs on the (unwrapped) Llava model, so
PEFT, DeepSpeed and DDP wrappers still run the stock forward. Held by ``tests/model/test_causal_padding.py`` (loss
and every gradient vs the masked forward, <= 1e-5 fp32; the mask really dropped; left padding and eval keep it).
"""

from __future__ import annotations

import torch
from torch import nn

from llava.constants import IGNORE_INDEX
from llava.model.packed_attention import PACKED_SDPA

CAUSAL_ONLY_ATTENTION = ("sdpa", PACKED_SDPA)
_ATTR = "_llava_causal_padding_handle"


def is_right_padding(attention_mask: torch.Tensor) -> bool:
    """Every row of a 2-D 0/1 mask is ones then zeros (no real token after a pad)."""
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _drop_padding_mask(module: nn.Module, args, kwargs):
    mask, labels = kwargs.get("attention_mask"), kwargs.get("labels")
    if (mask is None or labels is None or not module.training or kwargs.get("past_key_values") is not None
            or mask.dim() != 2 or labels.shape != mask.shape
            or getattr(module.config.text_config, "_attn_implementation", None) not in CAUSAL_ONLY_ATTENTION):
        return None
    if not is_right_padding(mask) or not bool((labels[~mask.bool()] == IGNORE_INDEX).all()):
        return None
    return args, {**kwargs, "attention_mask": None}


def use_causal_padding(model: nn.Module, enable: bool = True) -> bool:
    """Switch the (possibly PEFT-wrapped) Llava model's training forwards to causal attention without the padding
    mask where that is exact (see the module docstring), or back. Returns whether it is on."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = getattr(llava, _ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(llava, _ATTR)
    if not enable:
        return False
    setattr(llava, _ATTR, llava.register_forward_pre_hook(_drop_padding_mask, with_kwargs=True))
    return True
