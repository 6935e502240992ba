"""LLaVA on megatron-core: ``GPTModel`` for the language model, the Hugging Face vision tower and projector in front.

    model = LlavaGPTModel(transformer_config(mca, parallel), mca, padded_vocab, hf_config,
                          pre_process=True, post_process=False, vp_stage=0)
    out = model(input_ids, position_ids, attention_mask, pixel_values=pixels)     # hidden states / logits

``LlavaGPTModel`` is a ``GPTModel`` subclass (the way ROLL adds Qwen2-VL): on the first pipeline stage (first
virtual chunk) it also holds ``vision_model`` (the HF ``CLIPVisionModel`` / ``SiglipVisionModel``) and
``multi_modal_projector`` (HF ``LlavaMultiModalProjector``), replicated on every tensor-parallel rank. Its state
dict keys are the MCA names of ``llava.megatron.converter.conversion_templates`` (``embedding.*``, ``decoder.*``, ``vision_model.*``,
``multi_modal_projector.*``), so the converter's shards load into it as they are.

Forward on the first stage: word embeddings (vocab-parallel, never scattered) -> image features written at the
image-token positions in token order (as ``LlavaModel``'s ``masked_scatter``) -> scattered over the sequence when
``--sequence_parallel`` -> ``decoder_input`` of the decoder. The last stage returns vocab-parallel logits
``[b, s, v/tp]``; :func:`token_losses` turns them into per-token losses with the HF path's label shift.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from transformers import AutoModel, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from llava.constants import IGNORE_INDEX
from llava.megatron.backend.packed_thd import PackedDotProductAttention

ACTIVATIONS = {"silu": torch.nn.functional.silu}


def transformer_config(mca: dict, *, tp: int, pp: int, vpp: int | None, sequence_parallel: bool,
                       dtype: torch.dtype = torch.float32, **overrides) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` from an MCA config dict (``llava.megatron.converter.mcore_config.hf_to_mca_config``)."""
    kwargs = dict(
        num_layers=mca["num_layers"],
        hidden_size=mca["hidden_size"],
        num_attention_heads=mca["num_attention_heads"],
        num_query_groups=mca["num_query_groups"],
        ffn_hidden_size=mca["ffn_hidden_size"],
        kv_channels=mca["kv_channels"],
        layernorm_epsilon=mca["layernorm_epsilon"],
        normalization=mca["normalization"],
        gated_linear_unit=mca["gated_linear_unit"],
        activation_func=ACTIVATIONS[mca["activation_func"]],
        add_bias_linear=mca["add_bias_linear"],
        add_qkv_bias=mca["add_qkv_bias"],
        qk_layernorm=mca["qk_layernorm"],
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        calculate_per_token_loss=True,  # the HF path's per-token mean over the whole step (num_items_in_batch)
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class SequenceParallelNorm:
    """torch ``RMSNorm`` / ``LayerNorm`` whose weights are marked ``sequence_parallel``, so megatron-core's
    ``finalize_model_grads`` all-reduces their gradients over the TP group. megatron-core's own local-spec norm
    (``WrappedTorchNorm``) refuses ``--sequence_parallel`` (only TransformerEngine's norm supports it)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def layer_block_spec(mca: dict, config: TransformerConfig, vp_stage: int | None):
    """The local (no TransformerEngine) layer spec with ``PackedDotProductAttention``; with sequence parallelism, a
    block spec of this stage's layers whose norms (the final norm too) are ``SequenceParallelNorm``."""

    spec = get_gpt_layer_local_spec(qk_layernorm=mca["qk_layernorm"], normalization=mca["normalization"])
    attn = spec.submodules.self_attention  # core attention that also takes THD packed sequences (--packing)
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules,
                                                                    core_attention=PackedDotProductAttention))
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))
    if not config.sequence_parallel:
        return spec

    sub = dataclasses.replace(spec.submodules, input_layernorm=SequenceParallelNorm,
                              pre_mlp_layernorm=SequenceParallelNorm)
    if mca["qk_layernorm"]:
        attn = spec.submodules.self_attention
        attn_sub = dataclasses.replace(attn.submodules, q_layernorm=SequenceParallelNorm,
                                       k_layernorm=SequenceParallelNorm)
        sub = dataclasses.replace(sub, self_attention=dataclasses.replace(attn, submodules=attn_sub))
    layer = dataclasses.replace(spec, submodules=sub)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=SequenceParallelNorm)


class LlavaGPTModel(GPTModel):
    """``GPTModel`` + (first stage only) the HF vision tower and projector; see the module docstring."""

    def __init__(self, config: TransformerConfig, mca: dict, padded_vocab_size: int, hf_config: LlavaConfig, *,
                 pre_process: bool, post_process: bool, vp_stage: int | None = None, vision: bool | None = None):
        super().__init__(
            config,
            layer_block_spec(mca, config, vp_stage),
            vocab_size=padded_vocab_size,
            max_sequence_length=mca["max_sequence_length"],
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=mca["share_embeddings_and_output_weights"],
            position_embedding_type=mca["position_embedding_type"],
            rotary_base=mca["rotary_base"],
            rope_scaling=mca.get("rope_scaling", False),
            rope_scaling_factor=mca.get("rope_scaling_factor", 8.0),
            seq_len_interpolation_factor=mca.get("seq_len_interpolation_factor"),
            scatter_embedding_sequence_parallel=False,  # image features go in first; scattered in forward()
            vp_stage=vp_stage,
        )
        self.vocab_size_real = mca["vocab_size"]
        self.image_token_id = hf_config.image_token_id
        self.vision_feature_layer = hf_config.vision_feature_layer
        self.vision_feature_select_strategy = hf_config.vision_feature_select_strategy
        self.has_vision = pre_process if vision is None else vision
        if self.has_vision:
            dtype = config.params_dtype
            self.vision_model = AutoModel.from_config(hf_config.vision_config).to(dtype)
            self.multi_modal_projector = LlavaMultiModalProjector(hf_config).to(dtype)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images * tokens_per_image, hidden]: what ``LlavaModel.get_image_features`` computes."""
        out = self.vision_model(pixel_values.to(self.config.params_dtype), output_hidden_states=True)
        layers = self.vision_feature_layer
        pool = [out.hidden_states[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if self.vision_feature_select_strategy == "default":
            pool = [h[:, 1:] for h in pool]
        features = self.multi_modal_projector(torch.cat(pool, dim=-1))
        return features.reshape(-1, features.shape[-1])

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                pixel_values: torch.Tensor | None = None, **kwargs):
        if self.pre_process and decoder_input is None:
            embeddings = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h], not scattered
            if self.has_vision and pixel_values is not None:
                embeddings = self._merge_image_features(input_ids, embeddings, pixel_values)
            if self.config.sequence_parallel:
                embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
            decoder_input = embeddings
        return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
                               **kwargs)

    def _merge_image_features(self, input_ids, embeddings, pixel_values):
        features = self.image_features(pixel_values)
        mask = (input_ids == self.image_token_id).transpose(0, 1)  # [s, b], the order of the embeddings
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"Image features and image tokens do not match: tokens {int(mask.sum())}, "
                             f"features {features.shape[0]}")
        # image tokens of sample 0 first, then sample 1...: write features in [b, s] order into the [s, b] tensor
        index = mask.transpose(0, 1).nonzero()  # (b, s) pairs in token order
        out = embeddings.clone()
        out[index[:, 1], index[:, 0]] = features.to(embeddings.dtype)
        return out


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Megatron predicts ``labels[t]`` at position t; HF shifts inside the loss: token t predicts token t+1."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def token_losses(logits: torch.Tensor, shifted_labels: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """Per-token cross entropy of vocab-parallel ``logits`` [b, s, v/tp] (fp32) and the loss mask [b, s].

    Rows past the real vocabulary (padding to a multiple of TP) are masked to -inf, so the softmax is the HF
    model's over its real vocabulary."""
    logits = logits.float()
    part = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * part
    if start + part > vocab_size:
        pad = torch.arange(start, start + part, device=logits.device) >= vocab_size
        logits = logits.masked_fill(pad, float("-inf"))
    mask = shifted_labels != IGNORE_INDEX
    target = shifted_labels.masked_fill(~mask, 0)
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                                          target.transpose(0, 1).contiguous())
    return losses.transpose(0, 1), mask
