"""Varlen attention for packed rows without flash-attention: SDPA per sample, so no masked-out block is computed.

    from llava.model.packed_attention import use_packed_sdpa
    use_packed_sdpa(model)          # the language model's attention becomes "llava_packed_sdpa"
    use_packed_sdpa(model, False)   # back to "sdpa" (done before saving: the name is ours, not transformers')

Stock ``sdpa`` on a packed row (``DataCollatorWithPacking``) gets a dense block-diagonal causal mask of the whole
row: it computes every query against every key of the row (other samples and the causal upper triangle included)
and then masks them out, so a row of k samples costs about k times the attention work of its samples run alone,
and an explicit mask also keeps CPU/GPU kernels from skipping the causal half. Flash-attention varlen solves this on
GPU from ``cu_seqlens``; this is the same idea for any device: the row is cut at every position-id restart and
``scaled_dot_product_attention(..., is_causal=True)`` runs on each sample. Batches without packed rows (a padded
batch with its ``attention_mask``, generation with a cache) take transformers' own ``sdpa`` path unchanged, and
the mask function (``packed_sdpa_mask``) builds the same masks as ``sdpa``'s for them, so the results equal
``sdpa``'s up to float rounding (held by ``tests/train/test_packing.py``). For packed rows it builds none: stock
``sdpa`` gets a dense block-diagonal ``[B, 1, T, T]`` mask there, which the per-sample attention never reads. The
samples' sizes are found once per forward, by a forward pre-hook on the language model that hands them to every
layer's attention through the layers' ``**kwargs`` (one host sync per step, not one per layer); a sample starts
where the position id does not follow its neighbour by 1, transformers' own packed-row rule.

Measured with ``scripts/bench_train.py`` (figures in ``docs/performance.md`` and ``docs/benchmark_log.md``): faster
than the masked row on an otherwise idle machine, slower when the cores are oversubscribed (many small
split/cat/SDPA calls suffer more from descheduled threads than one big one). ``--packing_attention mask`` selects the
masked row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "llava_packed_sdpa"
SIZES_KWARG = "llava_packed_sample_sizes"  # per row, the sample lengths; passed from the hook to every layer
_HOOK_ATTR = "_llava_packed_sizes_hook"


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  is_causal=None, **kwargs):
    """``query/key/value``: ``[batch, heads, seq, head_dim]``; returns ``([batch, seq, heads, head_dim], None)``."""
    sizes = kwargs.pop(SIZES_KWARG, None)
    if sizes is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # grouped-query heads attend to their key/value head in SDPA itself (enable_gqa): no repeated copies of the
    # keys and values, and no sum over those copies in the backward pass
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    dropout = dropout if module.training else 0.0
    # split/cat, never slice-indexing: the backward of a slice writes a zero tensor of the whole input per slice,
    # the backward of split is one cat (measured: slicing made this slower than the masked full-row attention).
    # The cuts are made on the projections' own [batch, seq, heads, head_dim] layout (query.transpose(1, 2) is a view
    # of it) and SDPA's outputs are concatenated back in that layout: the result is the returned contiguous tensor,
    # with no transposed copy after the cat (the same values to the bit; 1.06x on the attention alone, fwd + bwd)
    rows = []
    for row_sizes, q, k, v in zip(sizes, query.transpose(1, 2).split(1), key.transpose(1, 2).split(1),
                                  value.transpose(1, 2).split(1)):
        rows.append(torch.cat([
            F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                           dropout_p=dropout, scale=scaling, is_causal=True,
                                           enable_gqa=gqa).transpose(1, 2)
            for qs, ks, vs in zip(q.split(row_sizes, dim=1), k.split(row_sizes, dim=1), v.split(row_sizes, dim=1))
        ], dim=1))
    return torch.cat(rows, dim=0), None


def sample_sizes(position_ids: torch.Tensor, batch_size: int | None = None) -> list[list[int]] | None:
    """Per row, the lengths of its samples; None when no row is packed. A sample starts wherever the position id
    does not follow its left neighbour by 1 -- transformers' own rule (``masking_utils.find_packed_sequence_indices``),
    so the rows this cuts are exactly the rows transformers would give a block-diagonal mask. One host sync."""
    if batch_size is not None and position_ids.shape[0] != batch_size:
        position_ids = position_ids.expand(batch_size, -1)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    found = starts.nonzero().tolist()  # [[row, column], ...] in row-major order
    if len(found) == position_ids.shape[0]:  # one sample per row
        return None
    length = position_ids.shape[1]
    per_row: list[list[int]] = [[] for _ in range(position_ids.shape[0])]
    for row, column in found:
        per_row[row].append(column)
    return [[b - a for a, b in zip(row, [*row[1:], length])] for row in per_row]


def _note_sample_sizes(module, args, kwargs):
    """Forward pre-hook of the language model: the sample sizes of a packed batch, once per forward (not per layer),
    handed to every attention call through the layers' ``**kwargs``."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or SIZES_KWARG in kwargs:
        return None
    embeds = kwargs.get("inputs_embeds")
    batch = embeds.shape[0] if embeds is not None else None
    return args, {**kwargs, SIZES_KWARG: sample_sizes(position_ids, batch)}


def packed_sdpa_mask(*args, **kwargs):
    """``sdpa``'s mask, except for packed rows: none is built, since the per-sample attention never reads it.

    ``create_causal_mask`` turns ``allow_is_causal_skip`` off for a mask-less, cache-less batch exactly when it finds
    packed rows in the position ids (the language models trained here pass no or/and mask functions); those rows are
    the ones :func:`sample_sizes` cuts. Padded batches (a 2-D ``attention_mask``) and generation (a cache: a query
    offset or a longer key length) get ``sdpa``'s mask unchanged."""
    if (kwargs.get("attention_mask") is None and not kwargs.get("allow_is_causal_skip", True)
            and not args and kwargs.get("q_offset", 0) == 0 and kwargs.get("kv_length") == kwargs.get("q_length")):
        return None
    return sdpa_mask(*args, **kwargs)


def register_packed_sdpa() -> None:
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def use_packed_sdpa(model, enable: bool = True) -> None:
    """Switch the (possibly PEFT-wrapped) Llava model's language model between ``llava_packed_sdpa`` and ``sdpa``;
    the vision tower keeps its own implementation."""
    register_packed_sdpa()
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    language_model = llava.model.language_model
    handle = language_model.__dict__.pop(_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
    name = PACKED_SDPA if enable else "sdpa"
    language_model.set_attn_implementation(name)  # it holds a config object of its own (see builder)
    llava.config.text_config._attn_implementation = name
    if enable:
        language_model.__dict__[_HOOK_ATTR] = language_model.register_forward_pre_hook(_note_sample_sizes,
                                                                                       with_kwargs=True)
