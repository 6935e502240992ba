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
``AttentionMaskInterface`` builds the same masks as for ``sdpa``, so the results equal ``sdpa``'s exactly up to
float rounding (held by ``tests/train/test_packing.py``).

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


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  is_causal=None, **kwargs):
    """``query/key/value``: ``[batch, heads, seq, head_dim]``; returns ``([batch, seq, heads, head_dim], None)``."""
    position_ids = kwargs.get("position_ids")
    starts = _sample_starts(position_ids) if position_ids is not None and query.shape[2] == key.shape[2] else None
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # grouped-query heads attend to their key/value head in SDPA itself (enable_gqa): no repeated copies of the
    # keys and values, and no sum over those copies in the backward pass
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    dropout = dropout if module.training else 0.0
    # split/cat, never slice-indexing: the backward of a slice writes a zero tensor of the whole input per slice,
    # the backward of split is one cat (measured: slicing made this slower than the masked full-row attention)
    rows = []
    for row_starts, q, k, v in zip(starts, query.split(1), key.split(1), value.split(1)):
        sizes = [b - a for a, b in zip(row_starts, row_starts[1:])]
        rows.append(torch.cat([
            F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=scaling, is_causal=True,
                                           enable_gqa=gqa)
            for qs, ks, vs in zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2))
        ], dim=2))
    out = torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def _sample_starts(position_ids: torch.Tensor) -> list[list[int]] | None:
    """Per row, the offsets where a sample starts (position id 0) plus the row length; None when no row is packed."""
    restarts = position_ids[:, 1:] == 0
    if not bool(restarts.any()):
        return None
    length = position_ids.shape[1]
    return [[0, *((r.nonzero().flatten() + 1).tolist()), length] for r in restarts]


def register_packed_sdpa() -> None:
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def use_packed_sdpa(model, enable: bool = True) -> None:
    """Switch the (possibly PEFT-wrapped) Llava model's language model between ``llava_packed_sdpa`` and ``sdpa``;
    the vision tower keeps its own implementation."""
    register_packed_sdpa()
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = PACKED_SDPA if enable else "sdpa"
    llava.model.language_model.set_attn_implementation(name)  # it holds a config object of its own (see builder)
    llava.config.text_config._attn_implementation = name
