"""Test support: tiny Hugging Face checkpoints built from configs (nothing downloaded), saved with save_pretrained.

Every parameter is re-drawn from a seeded normal (HF initialises norms to 1 and biases to 0, which would hide
a misplaced norm or bias), so a conversion mistake changes values. Vocab 100 is padded on import (to 128 x TP).
Shapes: hidden 64, 4 layers (PP 2 x VPP 2 possible), ffn 96; Llama has 8 heads / 4 KV heads (GQA, untied),
Qwen2 4 heads / 4 KV heads with q/k/v biases and tied embeddings; all split over TP 1, 2 and 4.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, max_position_embeddings=64)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)


def _save(model: transformers.PreTrainedModel, path: Path, seed: int) -> Path:
    _randomize(model, seed)
    model.save_pretrained(path)
    return path


def llama_config(**overrides) -> transformers.LlamaConfig:
    kw = dict(COMMON, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-5)
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    return _save(transformers.LlamaForCausalLM(llama_config(**overrides)), path, seed)


def tiny_qwen2(path: Path, seed: int = 1, **overrides) -> Path:
    kw = dict(COMMON, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    kw.update(overrides)
    return _save(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)), path, seed)


def tiny_qwen3(path: Path, seed: int = 2) -> Path:
    cfg = transformers.Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    return _save(transformers.Qwen3ForCausalLM(cfg), path, seed)


def tiny_mistral(path: Path, seed: int = 3) -> Path:
    cfg = transformers.MistralConfig(**COMMON, num_attention_heads=8, num_key_value_heads=2, sliding_window=None)
    return _save(transformers.MistralForCausalLM(cfg), path, seed)


def tiny_llava(path: Path, seed: int = 4) -> Path:
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=llama_config(), image_token_index=VOCAB - 1)
    return _save(transformers.LlavaForConditionalGeneration(cfg), path, seed)


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "mistral": tiny_mistral, "llava": tiny_llava}


def hf_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the saved HF causal LM (no cache, eval mode)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits
