"""Tests for the tiny real models: they reload through the same from_pretrained path as real checkpoints.

Run:  .venv/bin/pytest tests/demo/test_tiny_models.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlamaForCausalLM,
    SiglipVisionModel,
)

from llava.demo.shapes import generate_shapes_dataset
from llava.demo.tiny_models import CHAT_MARKER_TOKENS, llava_json_texts, write_demo_models, write_tiny_vision_tower

SIZE, PATCH = 64, 16
SPECIALS = ["<s>", "</s>", "<unk>", "<pad>", *CHAT_MARKER_TOKENS]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_caption=60, n_qa=100, n_heldout=40)


@pytest.fixture(scope="module")
def models(tmp_path_factory, data) -> dict[str, Path]:
    return write_demo_models(tmp_path_factory.mktemp("work"), data)


@pytest.fixture(scope="module")
def tokenizer(models):
    return AutoTokenizer.from_pretrained(models["llm"])


@pytest.fixture(scope="module")
def corpus(data) -> list[str]:
    return llava_json_texts([data["stage1_captions"], data["stage2_qa"], data["heldout_qa"]])


def test_demo_models_layout(models, tmp_path):
    assert models["vision_tower"].parent == models["llm"].parent
    assert models["vision_tower"].parent.name == "models"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (models["vision_tower"] / name).is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (models["llm"] / name).is_file()


@pytest.mark.parametrize(
    "kind, model_class, tokens", [("clip", CLIPVisionModel, 17), ("siglip", SiglipVisionModel, 16)]
)
def test_vision_tower_reloads_and_yields_patch_tokens(tmp_path, data, kind, model_class, tokens):
    out = write_tiny_vision_tower(tmp_path / kind, kind=kind, image_size=SIZE, patch_size=PATCH, hidden_size=64)
    processor = AutoImageProcessor.from_pretrained(out)
    assert type(processor).__name__.endswith("Pil"), "must load without torchvision"
    model = model_class.from_pretrained(out).eval()
    image = Image.new("RGB", (SIZE, SIZE), (255, 0, 128))
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, SIZE, SIZE)
    # known normalisation constants: CLIP's published mean/std, SigLIP's 0.5/0.5
    mean, std = {
        "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    }[kind]
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), mean, std)]
    torch.testing.assert_close(pixel_values[0, :, 10, 10], torch.tensor(expected), atol=1e-4, rtol=0)
    with torch.no_grad():
        hidden = model(pixel_values=pixel_values, output_hidden_states=True)
    assert hidden.last_hidden_state.shape == (1, tokens, 64)
    assert (SIZE // PATCH) ** 2 + (kind == "clip") == tokens
    assert len(hidden.hidden_states) == 3  # embeddings + 2 layers
    # a real shapes image runs too (the processor resizes/crops a 64x64 PNG to itself)
    record = next(r for r in json.loads(data["stage2_qa"].read_text()) if "image" in r)
    real = processor(Image.open(data["image_folder"] / record["image"]), return_tensors="pt")["pixel_values"]
    assert real.shape == (1, 3, SIZE, SIZE)


def test_special_tokens_are_single_ids_and_never_added(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == tuple(SPECIALS[:4])
    for token_id, token in enumerate(SPECIALS):
        assert tokenizer(token)["input_ids"] == [token_id]
        assert tokenizer(f"red{token}blue")["input_ids"][1:-1] == [token_id]
    ids = tokenizer("two red circles")["input_ids"]
    assert ids == tokenizer("two red circles", add_special_tokens=True)["input_ids"]
    assert not set(ids) & set(range(len(SPECIALS))), "calling the tokenizer must not add bos/eos"


def test_round_trip_and_offsets(tokenizer, corpus):
    samples = corpus[:200] + [
        "A chat between a curious human and an artificial intelligence assistant. USER: How many? ASSISTANT: 2</s>",
        "<|im_start|>user\nWhat colour are the shapes?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n",
        "café ☕ —  unseen\twords  ",
    ]
    for text in samples:
        encoded = tokenizer(text, return_offsets_mapping=True)
        assert tokenizer.decode(encoded["input_ids"]) == text
        spans = [tuple(span) for span in encoded["offset_mapping"]]
        # byte pieces of one multi-byte character share that character's span; otherwise spans tile the text
        distinct = [span for i, span in enumerate(spans) if i == 0 or span != spans[i - 1]]
        assert "".join(text[a:b] for a, b in distinct) == text, "offsets must tile the text"
        for token_id, (a, b) in zip(encoded["input_ids"], spans):
            piece = tokenizer.decode([token_id])
            if "\ufffd" not in piece:  # a piece of a multi-byte character decodes alone to U+FFFD
                assert text[a:b] == piece, (text, token_id, piece, (a, b))


def test_corpus_words_are_compact(tokenizer, corpus):
    for word in (" red", " circle", " left", " ASSISTANT", " USER", "What", " What", " colour", " shapes"):
        assert len(tokenizer(word)["input_ids"]) == 1, word
    n_words = sum(len(t.split()) for t in corpus)
    n_tokens = sum(len(tokenizer(t)["input_ids"]) for t in corpus)
    assert n_tokens < 1.6 * n_words


def test_chat_template_is_chatml(tokenizer):
    messages = [{"role": "user", "content": "How many shapes are there?"}, {"role": "assistant", "content": "3"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == ("<|im_start|>user\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\n"
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat shape?"}]}]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == "<|im_start|>user\n<image>\nWhat shape?<|im_end|>\n"


def test_llm_reloads_as_llama_with_gqa_and_untied_embeddings(models, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(models["llm"]).eval()
    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.hidden_size) == (4, 2, 128)
    assert config.num_hidden_layers == 2 and config.intermediate_size == 256
    assert not config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == config.vocab_size
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, 3)
    ids = torch.tensor([tokenizer("What colour are the shapes? red")["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    # random init with std 0.02 gives near-uniform predictions: loss close to ln(vocab)
    assert abs(out.loss.item() - math.log(len(tokenizer))) < 0.1
