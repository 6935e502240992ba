"""HF config dict <-> Megatron-Core (MCA) config dict, both ways.

``hf_to_mca_config`` reads the fields the template maps (hidden size, heads, query groups, ffn size, norm eps,
vocab, tied embeddings, head size), rope base and rope scaling (the factor is read, never assumed) and adds the
template's constants. ``mca_to_hf_config`` writes them back into a copy of the original HF config (kept beside
the shards), so an unchanged model exports a config equal to the one imported; with no original it builds a
minimal config from the MCA fields alone. MCA names are Megatron's ``TransformerConfig`` / ``GPTModel`` argument
names (``activation_func`` is a string here). Tested in ``tests/megatron/converter/test_megatron_ops_config.py``.
"""

from __future__ import annotations

import copy

from llava.megatron.converter.conversion_templates import Template

# Megatron's llama3 rope scaling hard-codes these (megatron/core/models/common/embeddings/rotary_pos_embedding.py)
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_NO_DEFAULT = lambda mca: object()  # noqa: E731
# MCA fields hf_to_mca_config fills in when the HF config leaves them out
_IMPLICIT = {
    "num_query_groups": lambda mca: mca["num_attention_heads"],
    "kv_channels": lambda mca: mca["hidden_size"] // mca["num_attention_heads"],
    "share_embeddings_and_output_weights": lambda mca: False,
}


def _text(hf_config: dict, template: Template) -> dict:
    return hf_config[template.text_config_key] if template.text_config_key else hf_config


def _rope(text: dict) -> tuple[float, dict]:
    params = text.get("rope_parameters") or {}
    theta = params.get("rope_theta", text.get("rope_theta", 10000.0))
    scaling = text.get("rope_scaling") or params
    return float(theta), scaling


def hf_to_mca_config(hf_config: dict, template: Template) -> dict:
    """MCA config for an HF config dict (the whole config; multimodal templates read their text config)."""
    text = _text(hf_config, template)
    mca = dict(template.constant_mca_config)
    for hf_key, mca_key in template.config_hf_to_mca.items():
        if text.get(hf_key) is not None:
            mca[mca_key] = text[hf_key]
    if template.text_config_key and "tie_word_embeddings" in hf_config:  # llava: the top-level flag ties lm_head
        mca["share_embeddings_and_output_weights"] = hf_config["tie_word_embeddings"]
    mca.setdefault("share_embeddings_and_output_weights", False)
    mca.setdefault("num_query_groups", mca["num_attention_heads"])
    mca.setdefault("kv_channels", mca["hidden_size"] // mca["num_attention_heads"])

    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{template.hf_model_type}: hidden_act={act!r} is not supported (SwiGLU with silu only)")
    for flag in ("attention_bias", "mlp_bias"):
        if text.get(flag) and not (flag == "attention_bias" and mca.get("add_qkv_bias")):
            raise ValueError(f"{template.hf_model_type}: {flag}=True is not supported by this template")

    theta, scaling = _rope(text)
    mca["rotary_base"] = theta
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        mca["seq_len_interpolation_factor"] = float(scaling["factor"])
    elif rope_type == "llama3":
        for key, megatron_value in MEGATRON_LLAMA3_ROPE.items():
            if float(scaling.get(key, megatron_value)) != megatron_value:
                raise ValueError(
                    f"llama3 rope scaling with {key}={scaling[key]} cannot be expressed in Megatron-Core, "
                    f"which fixes {key}={megatron_value}"
                )
        mca["rope_scaling"] = True
        mca["rope_scaling_factor"] = float(scaling["factor"])
    elif rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} has no Megatron-Core equivalent here (default, linear, llama3)")
    return mca


def mca_to_hf_config(mca: dict, template: Template, original: dict | None = None) -> dict:
    """HF config dict from an MCA config: a copy of ``original`` with the mapped fields overwritten."""
    hf = copy.deepcopy(original) if original else {"model_type": template.hf_model_type}
    if template.text_config_key:
        hf.setdefault(template.text_config_key, {})
    text = _text(hf, template)
    had_original = bool(original)
    for hf_key, mca_key in template.config_hf_to_mca.items():
        if mca_key not in mca:
            continue
        if had_original and hf_key not in text and mca[mca_key] == _IMPLICIT.get(mca_key, _NO_DEFAULT)(mca):
            continue  # the original left this at its default; keep it implicit
        text[hf_key] = mca[mca_key]
    if template.text_config_key and (not had_original or "tie_word_embeddings" in hf):
        hf["tie_word_embeddings"] = mca["share_embeddings_and_output_weights"]

    if "rope_theta" in text and "rope_parameters" not in text:  # transformers 4 style
        text["rope_theta"] = mca["rotary_base"]
        scaling = dict(text.get("rope_scaling") or {})
    else:
        scaling = text.setdefault("rope_parameters", {})
        scaling["rope_theta"] = mca["rotary_base"]
    type_key = "type" if "type" in scaling else "rope_type"  # transformers 4 configs may say "type"
    if mca.get("rope_scaling"):
        scaling.setdefault(type_key, "llama3")
        scaling["factor"] = mca["rope_scaling_factor"]
        for key, value in MEGATRON_LLAMA3_ROPE.items():
            scaling.setdefault(key, value)
    elif mca.get("seq_len_interpolation_factor"):
        scaling.setdefault(type_key, "linear")
        scaling["factor"] = mca["seq_len_interpolation_factor"]
    elif "rope_parameters" in text:
        scaling.setdefault("rope_type", "default")
    if "rope_parameters" not in text and scaling:
        text["rope_scaling"] = scaling
    return hf
