"""Training prompt = inference prompt: the chat template saved with the processor renders the training ids.

    pytest tests/data/test_chat_templates.py

For every named template, with the SentencePiece and the byte-level BPE tokenizer: the processor is built as a
training run builds it (``make_llava_processor`` + ``set_chat_template``), saved, and loaded back with
``AutoProcessor``; ``processor.apply_chat_template(conversation, tokenize=True)`` with the images as
``{"type": "image"}`` parts then equals the ``input_ids`` training uses for that record (whose ids
``test_template_references.py`` holds against the references), and the generation prompt equals
``build_generation_prompt``'s. With the contents as the records' strings, the saved template + the processor's
tokenization give the training ids for every conversation under both ``--image_placement`` values. ``auto`` (the
tokenizer's own published template saved) likewise. The end-to-end launcher test checks the same on a checkpoint
written by a real run.
"""

from __future__ import annotations

import copy

import pytest
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

from llava.constants import DEFAULT_IM_START_TOKEN
from llava.data.chat_templates import set_chat_template
from llava.data.records import Message
from llava.data.templates import get_template, place_images
from llava.data.tokenize import build_generation_prompt, tokenize_conversation
from llava.demo.tiny_models import write_tiny_vision_tower
from llava.model.builder import add_multimodal_tokens, make_llava_processor, num_image_tokens
from tests.data.test_template_references import (  # noqa: F401
    AUTO_CASES,
    CASES,
    CONVERSATIONS,
    JINJA,
    PLAIN_CONVERSATIONS,
    tokenizers,
)

IMG = "<image>"


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    path = write_tiny_vision_tower(tmp_path_factory.mktemp("tower") / "clip")
    config = AutoConfig.from_pretrained(path)
    return {"image_processor": AutoImageProcessor.from_pretrained(path), "config": config,
            "num_image_tokens": num_image_tokens(config, "default")}


def as_chat(messages: list[Message], image: Image.Image) -> list[dict] | None:
    """The conversation as a processor user writes it: images as parts before the text; None if it cannot be."""
    chat = []
    for m in place_images(messages):
        k = m.content.count(IMG)
        if k and not m.content.startswith(f"{IMG}\n" * k):
            return None  # a multi-image record that keeps an image after its text
        if k:
            parts = [{"type": "image", "image": image}] * k + [{"type": "text", "text": m.content[len(IMG) * k + k:]}]
            chat.append({"role": m.role, "content": parts})
        else:
            chat.append({"role": m.role, "content": m.content})
    return chat


def saved_processor(tok, tower, template, out):
    """The processor as a training run builds it (on a copy of the tokenizer: set_chat_template changes it), saved and
    loaded back with ``AutoProcessor``."""
    processor = make_llava_processor(tower["image_processor"], copy.deepcopy(tok), tower["config"], "default")
    set_chat_template(processor, template)
    processor.save_pretrained(out)
    return AutoProcessor.from_pretrained(out)


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_saved_chat_template_renders_the_training_ids(tokenizers, tower, tmp_path, kind, name):  # noqa: F811
    tok = tokenizers[kind]
    template = get_template(name)
    loaded = saved_processor(tok, tower, template, tmp_path)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    image_id, n = tok.convert_tokens_to_ids(IMG), tower["num_image_tokens"]
    checked = 0
    for conv_name in PLAIN_CONVERSATIONS if name == "plain" else CONVERSATIONS:
        msgs = CONVERSATIONS[conv_name]
        chat = as_chat(msgs, image)
        if chat is None:
            continue
        train_ids = tokenize_conversation(msgs, template, tok, image_token_id=image_id, num_image_tokens=n,
                                          model_max_length=100_000).input_ids
        rendered = loaded.apply_chat_template(chat, tokenize=True, return_dict=True)
        assert rendered["input_ids"][0] == train_ids, (conv_name, loaded.apply_chat_template(chat, tokenize=False))
        prompt_ids = build_generation_prompt(msgs[:-1], template, tok, image_token_id=image_id, num_image_tokens=n)
        rendered = loaded.apply_chat_template(chat[:-1], tokenize=True, return_dict=True, add_generation_prompt=True)
        assert rendered["input_ids"][0] == prompt_ids, conv_name
        checked += 1
    assert checked >= (4 if name == "plain" else 14)


def processor_ids(processor, chat: list[dict], image: Image.Image, generation: bool = False) -> list[int]:
    """The saved chat template's text, then the processor's own tokenization of it with one image per ``<image>``."""
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
    k = text.count(IMG)
    if text.startswith(processor.tokenizer.bos_token or "\0"):  # as apply_chat_template(tokenize=True) calls it
        return processor(text=text, images=[image] * k or None, add_special_tokens=False)["input_ids"][0]
    return processor(text=text, images=[image] * k or None)["input_ids"][0]


@pytest.mark.parametrize("placement", ["front", "keep"])
@pytest.mark.parametrize(("kind", "name"), CASES)
def test_string_contents_render_the_training_ids(tokenizers, tower, tmp_path, kind, name, placement):  # noqa: F811
    """Every conversation with its contents as the records' strings (``<image>`` anywhere, several images), under
    either ``--image_placement``: the saved template places the image as training did."""
    tok = tokenizers[kind]
    template = get_template(name, image_front=placement == "front")
    loaded = saved_processor(tok, tower, template, tmp_path)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    image_id, n = tok.convert_tokens_to_ids(IMG), tower["num_image_tokens"]
    for conv_name in PLAIN_CONVERSATIONS if name == "plain" else CONVERSATIONS:
        msgs = CONVERSATIONS[conv_name]
        chat = [{"role": m.role, "content": m.content} for m in msgs]
        train_ids = tokenize_conversation(msgs, template, tok, image_token_id=image_id, num_image_tokens=n,
                                          model_max_length=100_000).input_ids
        assert processor_ids(loaded, chat, image) == train_ids, (conv_name, loaded.apply_chat_template(chat, tokenize=False))
        prompt_ids = build_generation_prompt(msgs[:-1], template, tok, image_token_id=image_id, num_image_tokens=n)
        assert processor_ids(loaded, chat[:-1], image, generation=True) == prompt_ids, conv_name


@pytest.mark.parametrize(("kind", "name"), AUTO_CASES)
def test_auto_saves_the_tokenizers_template_and_renders_the_training_ids(tokenizers, tower, tmp_path, kind, name):  # noqa: F811
    """``auto``: the tokenizer's own (published) template is saved; the conversation as training placed it (strings)
    renders the training ids, also where that template writes no BOS and the tokenizer would add one."""
    tok = copy.deepcopy(tokenizers[kind])
    tok.chat_template = JINJA[name]
    loaded = saved_processor(tok, tower, get_template("auto"), tmp_path)
    assert loaded.chat_template == JINJA[name]
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    image_id, n = tok.convert_tokens_to_ids(IMG), tower["num_image_tokens"]
    for conv_name, msgs in CONVERSATIONS.items():
        chat = [{"role": m.role, "content": m.content} for m in place_images(msgs)]
        train_ids = tokenize_conversation(msgs, get_template("auto"), tok, image_token_id=image_id, num_image_tokens=n,
                                          model_max_length=100_000).input_ids
        assert processor_ids(loaded, chat, image) == train_ids, conv_name


@pytest.mark.parametrize("name", ["vicuna_v1", "llama_2", "chatml"])
def test_start_end_tokens_render_the_training_ids(tokenizers, tower, tmp_path, name):  # noqa: F811
    """``--mm_use_im_start_end``: the saved template wraps each image as training does (``<im_start><image><im_end>``)."""
    tok = copy.deepcopy(tokenizers["sentencepiece"])
    add_multimodal_tokens(tok, True)
    template = get_template(name)
    processor = make_llava_processor(tower["image_processor"], tok, tower["config"], "default")
    set_chat_template(processor, template, mm_use_im_start_end=True)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (40, 30), (20, 90, 160))
    image_id, n = tok.convert_tokens_to_ids(IMG), tower["num_image_tokens"]
    start_id = tok.convert_tokens_to_ids(DEFAULT_IM_START_TOKEN)
    checked = 0
    for conv_name, msgs in CONVERSATIONS.items():
        chat = as_chat(msgs, image)
        if chat is None:
            continue
        train_ids = tokenize_conversation(msgs, template, tok, image_token_id=image_id, num_image_tokens=n,
                                          model_max_length=100_000, mm_use_im_start_end=True).input_ids
        rendered = loaded.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"][0]
        assert rendered == train_ids, (conv_name, loaded.apply_chat_template(chat, tokenize=False))
        assert train_ids.count(start_id) == sum(m.content.count(IMG) for m in msgs)
        checked += 1
    assert checked >= 14
