"""Conversation templates against the tiny tokenizer: `pytest tests/data/test_templates.py`.

For every template: tokenizing each rendered segment alone and concatenating gives the ids of the whole prompt;
the supervised tokens decode to exactly the assistant replies plus the template's end-of-turn marker (strings
written here by hand); the full rendered prompt equals a hand-written string; ``auto`` equals the tokenizer's own
``apply_chat_template``.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llava.constants import IGNORE_INDEX
from llava.data.records import Message
from llava.data.templates import TEMPLATES, get_template
from llava.data.tokenize import tokenize_conversation
from llava.model.builder import add_multimodal_tokens

Q1, A1, Q2, A2 = "What is the colour of the shape?", "The shape is red.", "How many shapes are there?", "three"
WITH_IMAGE = [
    Message("user", f"<image>\n{Q1}"),
    Message("assistant", A1),
    Message("user", Q2),
    Message("assistant", A2),
]
TEXT_ONLY = [Message("user", Q1), Message("assistant", A1), Message("user", Q2), Message("assistant", A2)]
WITH_SYSTEM = [Message("system", "Answer briefly."), *WITH_IMAGE]
CONVERSATIONS = {"image": WITH_IMAGE, "text": TEXT_ONLY, "system": WITH_SYSTEM}
NAMED = [name for name in TEMPLATES if name != "auto"]

# What each template supervises after each reply, written from the template formats (not from the code).
SUPERVISED_TURN = {
    "plain": lambda reply: f"{reply}\n",
    "vicuna_v1": lambda reply: f" {reply}</s>",
    "llava_v1": lambda reply: f" {reply}</s>",
    "llama_2": lambda reply: f" {reply} </s>",
    "llava_llama_2": lambda reply: f" {reply} </s>",
    "mistral_instruct": lambda reply: f" {reply} </s>",
    "mistral": lambda reply: f" {reply}</s>",
    "chatml": lambda reply: f"{reply}<|im_end|>",
    "llama3": lambda reply: f"{reply}<|eot_id|>",
    "llava_llama_3": lambda reply: f"{reply}<|eot_id|>",
    "auto": lambda reply: f"{reply}<|im_end|>",  # the tiny tokenizer ships a ChatML chat_template
}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_LLAMA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
# The text after the BOS (which every template but chatml places first, as its id).
EXPECTED_PROMPT = {
    "plain": f"<image>{A1}\n{A2}\n",
    "vicuna_v1": f"{VICUNA_SYSTEM} USER: <image>\n{Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT: {A2}</s>",
    "llava_llama_2": f"[INST] <<SYS>>\n{LLAVA_LLAMA_SYSTEM}\n<</SYS>>\n\n<image>\n{Q1} [/INST] {A1} </s>"
    f"<s>[INST] {Q2} [/INST] {A2} </s>",
    "mistral_instruct": f"[INST] <image>\n{Q1} [/INST] {A1} </s>[INST] {Q2} [/INST] {A2} </s>",
    "mistral": f" [INST] <image>\n{Q1} [/INST] {A1}</s> [INST] {Q2} [/INST] {A2}</s>",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    f"<|im_start|>user\n<image>\n{Q1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
    f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n{A2}<|im_end|>\n",
    "llama3": f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{Q1}<|eot_id|>"
    f"<|start_header_id|>assistant<|end_header_id|>\n\n{A1}<|eot_id|>"
    f"<|start_header_id|>user<|end_header_id|>\n\n{Q2}<|eot_id|>"
    f"<|start_header_id|>assistant<|end_header_id|>\n\n{A2}<|eot_id|>",
}
EXPECTED_WITH_SYSTEM = {
    "vicuna_v1": f"Answer briefly. USER: <image>\n{Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT: {A2}</s>",
    "chatml": "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
    f"<|im_start|>user\n<image>\n{Q1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
    f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n{A2}<|im_end|>\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
    f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{Q1}<|eot_id|>"
    f"<|start_header_id|>assistant<|end_header_id|>\n\n{A1}<|eot_id|>"
    f"<|start_header_id|>user<|end_header_id|>\n\n{Q2}<|eot_id|>"
    f"<|start_header_id|>assistant<|end_header_id|>\n\n{A2}<|eot_id|>",
}


def _text(segments) -> str:
    """The rendered text after the leading special (BOS) segment, which must be the tokenizer's BOS."""
    if segments and segments[0].special:
        assert segments[0].text == "<s>"
        segments = segments[1:]
    return "".join(s.text for s in segments)


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    add_multimodal_tokens(tok, False)
    return tok


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_segment_ids_concatenate_to_prompt_ids(tokenizer, name, conversation):
    segments = TEMPLATES[name].render_with_tokenizer(CONVERSATIONS[conversation], tokenizer)
    assert any(s.supervised for s in segments) and any(not s.supervised for s in segments)
    joined_ids = [i for s in segments for i in _ids(tokenizer, s.text)]
    assert joined_ids == _ids(tokenizer, "".join(s.text for s in segments))


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_supervised_tokens_decode_to_replies(tokenizer, name, conversation):
    messages = CONVERSATIONS[conversation]
    sample = tokenize_conversation(
        messages,
        get_template(name),
        tokenizer,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_image_tokens=3,
        model_max_length=1024,
    )
    supervised = [label for label in sample.labels if label != IGNORE_INDEX]
    assert all(label == tid for label, tid in zip(sample.labels, sample.input_ids) if label != IGNORE_INDEX)
    expected = "".join(SUPERVISED_TURN[name](m.content) for m in messages if m.role == "assistant")
    assert tokenizer.decode(supervised) == expected


@pytest.mark.parametrize("name", sorted(EXPECTED_PROMPT))
def test_rendered_prompt_matches_hand_written(tokenizer, name):
    segments = TEMPLATES[name].render_with_tokenizer(WITH_IMAGE, tokenizer)
    assert segments[0].special == (name != "chatml")
    assert _text(segments) == EXPECTED_PROMPT[name]
    assert "".join(s.text for s in segments if s.supervised).strip() != ""


@pytest.mark.parametrize("name", sorted(EXPECTED_WITH_SYSTEM))
def test_system_message_replaces_default_system(tokenizer, name):
    segments = TEMPLATES[name].render_with_tokenizer(WITH_SYSTEM, tokenizer)
    assert _text(segments) == EXPECTED_WITH_SYSTEM[name]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_auto_renders_the_tokenizers_chat_template(tokenizer, conversation):
    messages = CONVERSATIONS[conversation]
    segments = get_template("auto").render_with_tokenizer(messages, tokenizer)
    chat = [{"role": m.role, "content": m.content} for m in messages]
    assert "".join(s.text for s in segments) == tokenizer.apply_chat_template(chat, tokenize=False)
    prompt = [{"role": m.role, "content": m.content} for m in messages[:-1]]
    generation = get_template("auto").render_with_tokenizer(messages[:-1], tokenizer)
    assert "".join(s.text for s in generation) == tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True
    )


def test_auto_without_chat_template_is_an_error(tokenizer):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        get_template("auto").render_with_tokenizer(WITH_IMAGE, bare)


def test_template_names_and_llava_aliases():
    llava_names = {"plain", "vicuna_v1", "llava_v1", "llama_2", "llava_llama_2", "mistral_instruct", "llava_llama_3"}
    assert llava_names | {"mistral", "chatml", "llama3", "auto"} <= set(TEMPLATES)
    assert get_template("v1").name == "vicuna_v1" and get_template("qwen_2").name == "chatml"
    assert get_template("vicuna_v1", image_front=False).image_front is False and get_template("vicuna_v1").image_front
    with pytest.raises(ValueError, match="--version 'nope'"):
        get_template("nope")
