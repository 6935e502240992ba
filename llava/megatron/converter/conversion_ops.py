"""Conversion ops between Hugging Face and Megatron-Core (MCA) tensor names and layouts.

Each op claims a fixed set of HF names and produces a fixed set of MCA names (or the reverse, through
``mca_to_hf``). Names are patterns: a name starting with ``.`` is a per-layer suffix (the template strips and adds
``model.layers.{i}`` / ``decoder.layers.{i}``; ops never see layer prefixes); a name may hold one ``{}`` wildcard,
which matches any non-empty text and is carried over to the other side (``Rename("vision_tower.{}", ...)``).

Ops work on full (unsharded) tensors; ``cfg`` is the MCA config dict (``num_attention_heads``,
``num_query_groups``, ``kv_channels`` are read by the QKV op).
Tested in ``tests/megatron/converter/test_megatron_ops_config.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache

import torch

Tensor = torch.Tensor


@cache
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    if pattern.count("{}") > 1:
        raise ValueError(f"name pattern {pattern!r} has more than one '{{}}' wildcard")
    head, _, tail = pattern.partition("{}")
    body = re.escape(head) + ("(.+)" + re.escape(tail) if "{}" in pattern else "")
    return re.compile("^" + body + "$")


def match_name(pattern: str, name: str) -> str | None:
    """The text the ``{}`` wildcard of ``pattern`` matched in ``name`` ('' without a wildcard); None if no match."""
    m = _pattern_regex(pattern).match(name)
    if m is None:
        return None
    return m.group(1) if m.groups() else ""


def fill_name(pattern: str, capture: str) -> str:
    """Put ``capture`` into the ``{}`` of ``pattern`` (a pattern without a wildcard is returned as is)."""
    return pattern.replace("{}", capture) if "{}" in pattern else pattern


class ConverOp:
    """Base op: ``hf_names`` (inputs, in order) <-> ``mca_names`` (outputs, in order)."""

    def __init__(self, hf_names: str | list[str], mca_names: str | list[str]):
        self.hf_names = [hf_names] if isinstance(hf_names, str) else list(hf_names)
        self.mca_names = [mca_names] if isinstance(mca_names, str) else list(mca_names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hf_names} -> {self.mca_names})"

    def with_hf_names(self, rename: Callable[[str], str]) -> ConverOp:
        """A copy with every HF name passed through ``rename`` (multimodal templates move the text model)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.hf_names = [rename(n) for n in self.hf_names]
        return clone

    def hf_to_mca(self, tensors: list[Tensor], cfg: dict) -> list[Tensor]:
        raise NotImplementedError

    def mca_to_hf(self, tensors: list[Tensor], cfg: dict) -> list[Tensor]:
        raise NotImplementedError


class RenameConverOp(ConverOp):
    """One name to one name, tensor unchanged. ``{}`` wildcards pass whole subtrees through."""

    def hf_to_mca(self, tensors: list[Tensor], cfg: dict) -> list[Tensor]:
        return list(tensors)

    def mca_to_hf(self, tensors: list[Tensor], cfg: dict) -> list[Tensor]:
        return list(tensors)


class StackConverOp(ConverOp):
    """Concatenate several HF tensors into one MCA tensor along ``dim`` (SwiGLU: [gate; up] -> linear_fc1).

    The inverse splits into equal parts, so all inputs must have the same size along ``dim``.
    """

    def __init__(self, hf_names: list[str], mca_names: str, dim: int = 0):
        super().__init__(hf_names, mca_names)
        self.dim = dim

    def hf_to_mca(self, tensors: list[Tensor], cfg: dict) -> list[Tensor]:
        sizes = {t.shape[self.dim] for t in tensors}
        if len(sizes) != 1:
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"{self}: inputs must have equal size along dim {self.dim}, got shapes {shapes}")
        return [torch.cat(tensors, dim=self.dim)]

    def mca_to_hf(self, tensors: list[Tensor], cfg: dict) -> list[Tensor]:
        (fused,) = tensors
        return [t.clone() for t in torch.chunk(fused, len(self.hf_names), dim=self.dim)]


class QKVConverOp(ConverOp):
    """Fuse q, k, v into Megatron's ``linear_qkv`` layout: per query group g, [q heads of g..., k_g, v_g].

    With ``nh`` heads, ``ng`` query groups (GQA: ng < nh) and head size ``d``, q is [nh*d, ...], k and v are
    [ng*d, ...]; the result is [ng*(nh/ng + 2)*d, ...]. Works for weights ([out, in]) and biases ([out]) alike.
    """

    def _dims(self, cfg: dict) -> tuple[int, int, int]:
        nh, ng = cfg["num_attention_heads"], cfg["num_query_groups"]
        d = cfg["kv_channels"]
        if nh % ng:
            raise ValueError(f"{self}: num_attention_heads={nh} is not a multiple of num_query_groups={ng}")
        return nh, ng, d

    def hf_to_mca(self, tensors: list[Tensor], cfg: dict) -> list[Tensor]:
        q, k, v = tensors
        nh, ng, d = self._dims(cfg)
        rest = q.shape[1:]
        expected = {"q": nh * d, "k": ng * d, "v": ng * d}
        for name, t in zip("qkv", (q, k, v)):
            if t.shape[0] != expected[name]:
                raise ValueError(f"{self}: {name} has shape {tuple(t.shape)}, expected first dim {expected[name]}")
        q = q.reshape(ng, nh // ng * d, *rest)
        k = k.reshape(ng, d, *rest)
        v = v.reshape(ng, d, *rest)
        return [torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()]

    def mca_to_hf(self, tensors: list[Tensor], cfg: dict) -> list[Tensor]:
        (qkv,) = tensors
        nh, ng, d = self._dims(cfg)
        rest = qkv.shape[1:]
        per_group = nh // ng * d
        if qkv.shape[0] != ng * (per_group + 2 * d):
            raise ValueError(f"{self}: linear_qkv has shape {tuple(qkv.shape)}, expected {ng * (per_group + 2 * d)}")
        grouped = qkv.reshape(ng, per_group + 2 * d, *rest)
        q, k, v = torch.split(grouped, [per_group, d, d], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


class QKVBiasConverOp(QKVConverOp):
    """The bias variant of ``QKVConverOp`` (same interleave on a 1-D tensor); a separate name for templates."""


class DropConverOp(ConverOp):
    """HF names that carry nothing Megatron needs (e.g. ``rotary_emb.inv_freq`` buffers); dropped on import."""

    def __init__(self, hf_names: str | list[str]):
        super().__init__(hf_names, [])

    def hf_to_mca(self, tensors: list[Tensor], cfg: dict) -> list[Tensor]:
        return []

    def mca_to_hf(self, tensors: list[Tensor], cfg: dict) -> list[Tensor]:
        return []
