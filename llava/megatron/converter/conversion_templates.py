"""Conversion templates, looked up by the Hugging Face config's ``model_type``.

A template says how one HF model family maps onto Megatron-Core's ``GPTModel`` (local layer spec names):
which HF config fields become which MCA config fields, the conversion ops for the weights, and where the
decoder layers live (``hf_layer_prefix``). Add a family with ``register_template(...)`` at the bottom of this file;
``get_conversion_template(model_type)`` looks one up (named apart from ``llava.data.templates.get_template``, which
returns a *conversation* template).

Multimodal templates (``llava``) convert their language model through the text model's template (picked from
``text_config.model_type``) and pass the vision tower and projector through with ``{}`` renames, so a whole
Llava checkpoint round-trips. Tested in ``tests/megatron/converter/test_megatron_ops_config.py`` and
``tests/megatron/converter/test_megatron_errors.py``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from llava.megatron.converter.conversion_ops import (
    ConverOp,
    DropConverOp,
    QKVBiasConverOp,
    QKVConverOp,
    RenameConverOp,
    StackConverOp,
    fill_name,
    match_name,
)

MCA_LAYER_PREFIX = "decoder.layers."
_LAYER_RE = re.compile(r"^(\d+)(\..+)$")


class TemplateError(KeyError):
    """A missing template or a key no op claims; ``str()`` is the plain message (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Claim:
    """One op applied at one place: ``layer`` is None for top-level names; ``capture`` fills ``{}``."""

    op: ConverOp
    layer: int | None
    capture: str

    def _full(self, names: list[str], layer_prefix: str) -> list[str]:
        names = [fill_name(n, self.capture) for n in names]
        if self.layer is None:
            return names
        return [f"{layer_prefix}{self.layer}{n}" for n in names]


@dataclass
class Template:
    hf_model_type: str
    config_hf_to_mca: dict[str, str]
    weight_converters: list[ConverOp]
    hf_layer_prefix: str
    constant_mca_config: dict = field(default_factory=dict)
    hf_invalid_keys: list[str] = field(default_factory=list)
    # multimodal: the language model config lives under this key and is converted by its own template
    text_config_key: str | None = None
    # multimodal: naming variants {name: (text-model prefix rewrites, passthrough ops)}; the first whose
    # rewritten embedding name is in the checkpoint is used, and recorded so export writes the same names
    hf_variants: dict[str, tuple[dict[str, str], list[ConverOp]]] = field(default_factory=dict)
    variant: str | None = None

    # ---- name claims -------------------------------------------------------------------------------
    def _ops(self) -> list[ConverOp]:
        return self.weight_converters + [DropConverOp(k) for k in self.hf_invalid_keys]

    def _claim(self, key: str, side: str) -> Claim | None:
        prefix = self.hf_layer_prefix if side == "hf" else MCA_LAYER_PREFIX
        candidates: list[tuple[int | None, str]] = [(None, key)]
        if key.startswith(prefix):
            m = _LAYER_RE.match(key[len(prefix) :])
            if m:
                candidates.insert(0, (int(m.group(1)), m.group(2)))
        for layer, name in candidates:
            for op in self._ops():
                for pattern in op.hf_names if side == "hf" else op.mca_names:
                    if pattern.startswith(".") != (layer is not None):
                        continue
                    capture = match_name(pattern, name)
                    if capture is not None:
                        return Claim(op, layer, capture)
        return None

    def claim_hf(self, key: str) -> Claim:
        """The op (and layer) that converts HF ``key``; a clear error naming the key if none does."""
        claim = self._claim(key, "hf")
        if claim is None:
            raise TemplateError(
                f"HF key {key!r} is not claimed by any conversion op of template {self.hf_model_type!r} "
                f"(layer prefix {self.hf_layer_prefix!r}); add an op or list it in hf_invalid_keys"
            )
        return claim

    def claim_mca(self, key: str) -> Claim:
        claim = self._claim(key, "mca")
        if claim is None:
            raise TemplateError(
                f"MCA key {key!r} is not produced by any conversion op of template {self.hf_model_type!r}"
            )
        return claim

    def hf_keys(self, claim: Claim) -> list[str]:
        return claim._full(claim.op.hf_names, self.hf_layer_prefix)

    def mca_keys(self, claim: Claim) -> list[str]:
        return claim._full(claim.op.mca_names, MCA_LAYER_PREFIX)

    # ---- multimodal resolution ---------------------------------------------------------------------
    def resolve(self, hf_config: dict, hf_keys: Iterable[str] | None = None, variant: str | None = None) -> Template:
        """The template that converts this checkpoint: itself for an LLM, text template + passthrough for Llava."""
        if self.text_config_key is None:
            return self
        text_cfg = hf_config.get(self.text_config_key) or {}
        text = get_conversion_template(text_cfg.get("model_type", "<missing text_config.model_type>"))
        if variant is None:
            keys = set(hf_keys or ())
            for name, (rewrites, _) in self.hf_variants.items():
                probe = _rewrite("model.embed_tokens.weight", rewrites)
                if probe in keys:
                    variant = name
                    break
            else:
                raise TemplateError(
                    f"template {self.hf_model_type!r}: none of the naming variants {list(self.hf_variants)} matches "
                    f"the checkpoint (no language-model embedding key found)"
                )
        rewrites, passthrough = self.hf_variants[variant]
        ops = [_rewrite_op(op, rewrites) for op in text.weight_converters] + list(passthrough)
        return dataclasses.replace(
            text,
            hf_model_type=self.hf_model_type,
            weight_converters=ops,
            hf_layer_prefix=_rewrite(text.hf_layer_prefix, rewrites),
            hf_invalid_keys=[_rewrite(k, rewrites) for k in text.hf_invalid_keys] + list(self.hf_invalid_keys),
            text_config_key=self.text_config_key,
            hf_variants={},
            variant=variant,
        )


def _rewrite(name: str, rewrites: dict[str, str]) -> str:
    for old, new in rewrites.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _rewrite_op(op: ConverOp, rewrites: dict[str, str]) -> ConverOp:
    return op.with_hf_names(lambda name: _rewrite(name, rewrites))


_TEMPLATES: dict[str, Template] = {}


def register_template(
    hf_model_type: str,
    config_hf_to_mca: dict[str, str],
    weight_converters: list[ConverOp],
    hf_layer_prefix: str,
    constant_mca_config: dict | None = None,
    hf_invalid_keys: list[str] | None = None,
    **kwargs,
) -> Template:
    """Register (or replace) the template for HF ``model_type`` == ``hf_model_type``."""
    template = Template(
        hf_model_type,
        dict(config_hf_to_mca),
        list(weight_converters),
        hf_layer_prefix,
        dict(constant_mca_config or {}),
        list(hf_invalid_keys or []),
        **kwargs,
    )
    _TEMPLATES[hf_model_type] = template
    return template


def get_conversion_template(hf_model_type: str) -> Template:
    """The registered template for an HF ``model_type``; a clear error listing the known types otherwise."""
    if hf_model_type not in _TEMPLATES:
        raise TemplateError(
            f"no conversion template for HF model_type {hf_model_type!r}; registered: {sorted(_TEMPLATES)}. "
            "Add one with llava.megatron.converter.conversion_templates.register_template(...)"
        )
    return _TEMPLATES[hf_model_type]


# ---- the families ------------------------------------------------------------------------------------

_LLM_CONFIG = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "intermediate_size": "ffn_hidden_size",
    "head_dim": "kv_channels",
    "rms_norm_eps": "layernorm_epsilon",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_sequence_length",
    "tie_word_embeddings": "share_embeddings_and_output_weights",
}
_LLM_CONSTANTS = {
    "normalization": "RMSNorm",
    "gated_linear_unit": True,
    "activation_func": "silu",
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "qk_layernorm": False,
    "position_embedding_type": "rope",
}


def _llm_ops(qkv_bias: bool = False, qk_norm: bool = False) -> list[ConverOp]:
    ops: list[ConverOp] = [
        RenameConverOp("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
        RenameConverOp("model.norm.weight", "decoder.final_layernorm.weight"),
        RenameConverOp("lm_head.weight", "output_layer.weight"),
        RenameConverOp(".input_layernorm.weight", ".input_layernorm.weight"),
        QKVConverOp(
            [".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight"],
            ".self_attention.linear_qkv.weight",
        ),
        RenameConverOp(".self_attn.o_proj.weight", ".self_attention.linear_proj.weight"),
        RenameConverOp(".post_attention_layernorm.weight", ".pre_mlp_layernorm.weight"),
        StackConverOp([".mlp.gate_proj.weight", ".mlp.up_proj.weight"], ".mlp.linear_fc1.weight", dim=0),
        RenameConverOp(".mlp.down_proj.weight", ".mlp.linear_fc2.weight"),
    ]
    if qkv_bias:
        ops.append(
            QKVBiasConverOp(
                [".self_attn.q_proj.bias", ".self_attn.k_proj.bias", ".self_attn.v_proj.bias"],
                ".self_attention.linear_qkv.bias",
            )
        )
    if qk_norm:
        ops.append(RenameConverOp(".self_attn.q_norm.weight", ".self_attention.q_layernorm.weight"))
        ops.append(RenameConverOp(".self_attn.k_norm.weight", ".self_attention.k_layernorm.weight"))
    return ops


_INV_FREQ = [".self_attn.rotary_emb.inv_freq"]  # buffers some older checkpoints saved

register_template("llama", _LLM_CONFIG, _llm_ops(), "model.layers.", _LLM_CONSTANTS, _INV_FREQ)
register_template("mistral", _LLM_CONFIG, _llm_ops(), "model.layers.", _LLM_CONSTANTS, _INV_FREQ)
register_template(
    "qwen2", _LLM_CONFIG, _llm_ops(qkv_bias=True), "model.layers.", {**_LLM_CONSTANTS, "add_qkv_bias": True}, _INV_FREQ
)
register_template(
    "qwen3", _LLM_CONFIG, _llm_ops(qk_norm=True), "model.layers.", {**_LLM_CONSTANTS, "qk_layernorm": True}, _INV_FREQ
)
register_template(
    "llava",
    {},
    [],
    "model.layers.",
    text_config_key="text_config",
    hf_variants={
        # what transformers' save_pretrained writes (its checkpoint conversion mapping restores these names)
        "legacy": (
            {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."},
            [
                RenameConverOp("vision_tower.{}", "vision_model.{}"),
                RenameConverOp("multi_modal_projector.{}", "multi_modal_projector.{}"),
            ],
        ),
        # the module names of transformers 5's LlavaForConditionalGeneration
        "modules": (
            {"model.": "model.language_model."},
            [
                RenameConverOp("model.vision_tower.{}", "vision_model.{}"),
                RenameConverOp("model.multi_modal_projector.{}", "multi_modal_projector.{}"),
            ],
        ),
    },
)
