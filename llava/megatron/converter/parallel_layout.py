"""Tensor- and pipeline-parallel layout of a full MCA state dict: split into TP x PP (x VPP) shards, merge back.

TP rules (by MCA key):
- column (split dim 0): ``linear_qkv`` (whole query groups per rank), word embeddings, output layer;
- swiglu: ``linear_fc1`` = [gate; up] is split as gate and up separately, rank r holds [gate_r; up_r];
- row (split dim 1): ``linear_proj``, ``linear_fc2`` weights;
- duplicated: norms and row-parallel biases, identical on every TP rank;
- passthrough: non-GPT tensors (a Llava vision tower, projector), stored once, on TP 0 of the first stage.

PP: ``num_layers`` is cut into ``pp * vpp`` equal chunks; chunk ``c = vp * pp + pp_rank`` holds global layers
``[c * n, (c + 1) * n)`` renumbered from 0 (Megatron's ``get_transformer_layer_offset``). Embeddings live on
the first chunk, final norm and output layer on the last; with tied embeddings and more than one stage the last
chunk also holds ``output_layer.weight`` (a copy of the embeddings, as Megatron keeps it).
Vocab-sized tensors are zero-padded to a multiple of ``tp * divisor`` on import and truncated on export.
Tested in ``tests/megatron/converter/test_megatron_layout.py`` (TP/PP/VPP layout) and
``tests/megatron/converter/test_megatron_roundtrip.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava.megatron.converter.conversion_templates import MCA_LAYER_PREFIX

COLUMN_SUFFIXES = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
SWIGLU_SUFFIXES = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")
ROW_SUFFIXES = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
DUPLICATED_SUFFIXES = (
    "input_layernorm.weight",
    "pre_mlp_layernorm.weight",
    "self_attention.q_layernorm.weight",
    "self_attention.k_layernorm.weight",
    "self_attention.linear_proj.bias",
    "mlp.linear_fc2.bias",
)
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
VOCAB_KEYS = (EMBEDDING, OUTPUT)


def padded_vocab_size(vocab_size: int, tp: int, divisor: int = 128) -> int:
    """Smallest multiple of ``tp * divisor`` that holds ``vocab_size`` (Megatron's make_vocab_size_divisible_by)."""
    multiple = tp * divisor
    return -(-vocab_size // multiple) * multiple


def pad_vocab(tensor: torch.Tensor, padded: int) -> torch.Tensor:
    if tensor.shape[0] > padded:
        raise ValueError(f"vocab tensor of shape {tuple(tensor.shape)} is larger than the padded vocab {padded}")
    if tensor.shape[0] == padded:
        return tensor
    pad = torch.zeros((padded - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=0)


def split_rule(key: str) -> str:
    """'column', 'swiglu', 'row', 'duplicated' or 'passthrough' for a global MCA key."""
    if key in VOCAB_KEYS:
        return "column"
    if key == FINAL_NORM:
        return "duplicated"
    if not key.startswith(MCA_LAYER_PREFIX):
        if key.startswith(("decoder.", "embedding.", "output_layer.")):
            raise ValueError(f"MCA key {key!r} has no tensor-parallel rule in llava.megatron.converter.parallel_layout")
        return "passthrough"
    for rule, suffixes in (
        ("column", COLUMN_SUFFIXES),
        ("swiglu", SWIGLU_SUFFIXES),
        ("row", ROW_SUFFIXES),
        ("duplicated", DUPLICATED_SUFFIXES),
    ):
        if key.endswith(suffixes):
            return rule
    raise ValueError(f"MCA key {key!r} has no tensor-parallel rule in llava.megatron.converter.parallel_layout")


def _chunk(key: str, tensor: torch.Tensor, tp: int, dim: int) -> list[torch.Tensor]:
    if tensor.shape[dim] % tp:
        raise ValueError(
            f"cannot split {key!r} of shape {tuple(tensor.shape)} across TP={tp}: dim {dim} ({tensor.shape[dim]}) "
            f"is not divisible by {tp}"
        )
    return list(torch.chunk(tensor, tp, dim=dim))


def split_tp(key: str, tensor: torch.Tensor, tp: int, num_query_groups: int | None = None) -> list[torch.Tensor]:
    """The ``tp`` shards of a full tensor (passthrough: one entry, for rank 0).

    ``linear_qkv`` goes by whole query groups, so ``num_query_groups`` (when given) must divide by ``tp``.
    """
    rule = split_rule(key)
    if num_query_groups is not None and key.endswith(COLUMN_SUFFIXES) and num_query_groups % tp:
        raise ValueError(
            f"cannot split {key!r} of shape {tuple(tensor.shape)} across TP={tp}: its {num_query_groups} query "
            f"groups (num_key_value_heads) are not divisible by {tp}"
        )
    if rule == "column":
        return _chunk(key, tensor, tp, 0)
    if rule == "row":
        return _chunk(key, tensor, tp, 1)
    if rule == "swiglu":
        gate, up = _chunk(key, tensor, 2, 0)
        return [torch.cat([g, u], dim=0) for g, u in zip(_chunk(key, gate, tp, 0), _chunk(key, up, tp, 0))]
    if rule == "duplicated":
        return [tensor] * tp
    return [tensor]


def merge_tp(key: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``split_tp``: the full tensor from its shards in TP-rank order."""
    rule = split_rule(key)
    if rule == "column":
        return torch.cat(shards, dim=0)
    if rule == "row":
        return torch.cat(shards, dim=1)
    if rule == "swiglu":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return shards[0]


@dataclass(frozen=True)
class ParallelLayout:
    """Where each global MCA key lives: (pp rank, virtual chunk, local key), with its TP ranks."""

    tp: int
    pp: int
    vpp: int | None
    num_layers: int
    tied: bool

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or (self.vpp is not None and self.vpp < 1):
            raise ValueError(f"tp, pp and vpp must be positive, got tp={self.tp} pp={self.pp} vpp={self.vpp}")
        if self.vpp is not None and self.vpp > 1 and self.pp == 1:
            raise ValueError("virtual pipeline parallelism (--vpp) needs pp > 1")
        if self.num_layers % self.num_chunks:
            raise ValueError(
                f"num_layers={self.num_layers} is not divisible by pp*vpp={self.pp}*{self.vpp or 1}={self.num_chunks}"
            )

    @property
    def num_vp(self) -> int:
        return self.vpp or 1

    @property
    def num_chunks(self) -> int:
        return self.pp * self.num_vp

    @property
    def layers_per_chunk(self) -> int:
        return self.num_layers // self.num_chunks

    def layer_location(self, layer: int) -> tuple[int, int, int]:
        """(pp rank, vp chunk, local layer) of a global layer."""
        chunk, local = divmod(layer, self.layers_per_chunk)
        vp, pp_rank = divmod(chunk, self.pp)
        return pp_rank, vp, local

    def global_layer(self, pp_rank: int, vp: int, local: int) -> int:
        return (vp * self.pp + pp_rank) * self.layers_per_chunk + local

    def placements(self, key: str) -> list[tuple[int, int, str]]:
        """Every (pp rank, vp chunk, local key) holding global MCA ``key``."""
        first, last = (0, 0), (self.pp - 1, self.num_vp - 1)
        if key.startswith(MCA_LAYER_PREFIX):
            layer_str, rest = key[len(MCA_LAYER_PREFIX) :].split(".", 1)
            pp_rank, vp, local = self.layer_location(int(layer_str))
            return [(pp_rank, vp, f"{MCA_LAYER_PREFIX}{local}.{rest}")]
        if key == EMBEDDING:
            where = [(*first, key)]
            if self.tied and first != last:
                where.append((*last, OUTPUT))
            return where
        if key in (OUTPUT, FINAL_NORM):
            return [(*last, key)]
        return [(*first, key)]

    def global_key(self, pp_rank: int, vp: int, local_key: str) -> str | None:
        """The global key of a stored local key; None for the tied copy of the embeddings on the last stage."""
        if local_key.startswith(MCA_LAYER_PREFIX):
            layer_str, rest = local_key[len(MCA_LAYER_PREFIX) :].split(".", 1)
            return f"{MCA_LAYER_PREFIX}{self.global_layer(pp_rank, vp, int(layer_str))}.{rest}"
        if local_key == OUTPUT and self.tied:
            return None
        return local_key
