"""Padding-free training (``--packing True``) on megatron-core's local spec: THD sequences, attention per sample.

    batch = thd_batch(packed_row_batch, width)     # collator output of one micro-batch -> one THD sequence
    out = chunk(ids, pos, None, packed_seq_params=batch["packed_seq_params"], ...)

megatron-core passes packed sequences as one sequence of all samples (``[t, 1, h]``, "THD") with
``PackedSeqParams(qkv_format="thd", cu_seqlens_q=...)``; its attention layer then applies rotary embeddings per
sample (positions restart at each boundary) but its local core attention (``DotProductAttention``) asserts
``packed_seq_params is None`` -- only TransformerEngine's attention takes THD. ``PackedDotProductAttention`` is
the local one with THD added: SDPA on each sample's slice (causal, the layer's scale, K/V heads repeated for GQA);
without packed params it is the stock ``DotProductAttention``. The hf backend's packing does the same (per-sample
attention, positions restarting), so packed and padded batches give the same per-token loss.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` + THD packed sequences (see the module docstring)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSeqParams | None = None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        # THD: query [t, heads, d], key/value [t, groups, d] (the attention layer squeezed the batch dim)
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            q = query[start:end].transpose(0, 1)  # [heads, len, d]
            k = key[start:end].transpose(0, 1).repeat_interleave(repeat, dim=0)
            v = value[start:end].transpose(0, 1).repeat_interleave(repeat, dim=0)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            outputs.append(out.transpose(0, 1))  # [len, heads, d]
        return torch.cat(outputs, dim=0)  # the attention layer reshapes to [t, 1, heads * d]


def packed_params(position_ids: torch.Tensor, device: torch.device | None = None) -> PackedSeqParams:
    """``PackedSeqParams`` of one packed row (positions restart at 0 at every sample)."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).reshape(-1).tolist()
    bounds = torch.tensor([*starts, pos.numel()], dtype=torch.int32, device=device)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, max_seqlen_q=longest,
                           max_seqlen_kv=longest)
