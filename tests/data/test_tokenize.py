"""Image-token expansion and truncation against real tiny towers: `pytest tests/data/test_tokenize.py`.

The number of image tokens per image is checked against the sequence length the real CLIP / SigLIP tower yields
at ``hidden_states[-2]`` under each select strategy; truncation is checked never to cut an image and never to
leave a sample with nothing supervised.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, SiglipVisionModel

from llava.constants import IGNORE_INDEX
from llava.data.records import Message
from llava.data.templates import get_template
from llava.data.tokenize import SampleRejected, tokenize_conversation
from llava.model.builder import add_multimodal_tokens, num_image_tokens, select_strategy

VICUNA = get_template("vicuna_v1")


def _tokenizer(tiny_models, mm_use_im_start_end: bool = False):
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    add_multimodal_tokens(tok, mm_use_im_start_end)
    return tok


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return _tokenizer(tiny_models)


def _tokenize(tok, messages, n_image_tokens, max_length=1024, **kwargs):
    return tokenize_conversation(
        messages,
        VICUNA,
        tok,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        num_image_tokens=n_image_tokens,
        model_max_length=max_length,
        **kwargs,
    )


def _image_runs(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of image ids."""
    runs, start = [], None
    for i, t in enumerate([*ids, None]):
        if t == image_id and start is None:
            start = i
        elif t != image_id and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize(
    ("tower_key", "model_cls", "select_feature", "drops_cls"),
    [
        ("vision_tower", CLIPVisionModel, "patch", True),
        ("vision_tower", CLIPVisionModel, "cls_patch", False),
        ("siglip_tower", SiglipVisionModel, "patch", False),
    ],
)
def test_image_tokens_equal_tower_features(tiny_models, tokenizer, tower_key, model_cls, select_feature, drops_cls):
    tower = model_cls.from_pretrained(tiny_models[tower_key]).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_models[tower_key])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[-2]
    features = hidden[:, 1:] if drops_cls else hidden
    strategy = select_strategy(tower.config, select_feature)
    assert strategy == ("default" if drops_cls else "full")
    n = num_image_tokens(tower.config, strategy)
    assert n == features.shape[1]

    messages = [Message("user", "<image>\nWhat colour?"), Message("assistant", "red")]
    sample = _tokenize(tokenizer, messages, n)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert sample.input_ids.count(image_id) == features.shape[1]
    assert [e - s for s, e in _image_runs(sample.input_ids, image_id)] == [features.shape[1]]


def test_several_images_each_expanded_and_never_supervised(tokenizer):
    messages = [
        Message("user", "<image>\nand\n<image>\nSame colour?"),
        Message("assistant", "red"),
        Message("user", "<image>\nThis one?"),
        Message("assistant", "three"),
    ]
    plain_ids = _tokenize(tokenizer, [Message(m.role, m.content.replace("<image>", "")) for m in messages], 5)
    sample = _tokenize(tokenizer, messages, 5)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    runs = _image_runs(sample.input_ids, image_id)
    assert [e - s for s, e in runs] == [5, 5, 5]
    assert all(sample.labels[i] == IGNORE_INDEX for s, e in runs for i in range(s, e))
    # removing the image tokens leaves the same supervised tokens as the text-only conversation
    assert [t for t in sample.labels if t != IGNORE_INDEX] == [t for t in plain_ids.labels if t != IGNORE_INDEX]
    assert tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX]) == " red</s> three</s>"


def test_mm_use_im_start_end_wraps_each_image_block(tiny_models):
    tok = _tokenizer(tiny_models, mm_use_im_start_end=True)
    image_id, start_id, end_id = tok.convert_tokens_to_ids(["<image>", "<im_start>", "<im_end>"])
    assert len({image_id, start_id, end_id, tok.unk_token_id}) == 4
    messages = [Message("user", "<image> <image>\nSame?"), Message("assistant", "no")]
    sample = _tokenize(tok, messages, 4, mm_use_im_start_end=True)
    runs = _image_runs(sample.input_ids, image_id)
    assert [e - s for s, e in runs] == [4, 4]
    for s, e in runs:
        assert sample.input_ids[s - 1] == start_id and sample.input_ids[e] == end_id
        assert sample.labels[s - 1] == IGNORE_INDEX and sample.labels[e] == IGNORE_INDEX
    assert sample.input_ids.count(start_id) == 2 and sample.input_ids.count(end_id) == 2
    unwrapped = _tokenize(tok, messages, 4)
    assert start_id not in unwrapped.input_ids and len(unwrapped.input_ids) == len(sample.input_ids) - 4


def test_long_text_is_cut_after_the_image(tokenizer):
    messages = [Message("user", "<image>\nDescribe it."), Message("assistant", "red " * 200)]
    full = _tokenize(tokenizer, messages, 16)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    last_image = max(i for i, t in enumerate(full.input_ids) if t == image_id)
    first_supervised = next(i for i, t in enumerate(full.labels) if t != IGNORE_INDEX)
    max_length = first_supervised + 3
    assert last_image < first_supervised < len(full.input_ids) - 10
    cut = _tokenize(tokenizer, messages, 16, max_length=max_length)
    assert cut.truncated and not full.truncated
    assert len(cut.input_ids) == max_length
    assert cut.input_ids.count(image_id) == 16
    assert cut.input_ids == full.input_ids[:max_length] and cut.labels == full.labels[:max_length]
    assert sum(t != IGNORE_INDEX for t in cut.labels) == 3


def test_image_beyond_max_length_is_rejected(tokenizer):
    messages = [Message("user", "Look: <image>\nDescribe it."), Message("assistant", "red")]
    full = _tokenize(tokenizer, messages, 16)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    last_image = max(i for i, t in enumerate(full.input_ids) if t == image_id)
    with pytest.raises(SampleRejected) as info:
        _tokenize(tokenizer, messages, 16, max_length=last_image)  # one image token would be cut
    assert info.value.kind == "image_tokens_exceed_max_length"
    with pytest.raises(SampleRejected) as info:  # every image token fits: now it is the text that is missing
        _tokenize(tokenizer, messages, 16, max_length=last_image + 1)
    assert info.value.kind == "no_supervised_tokens"


def test_sample_left_without_supervised_tokens_is_rejected(tokenizer):
    messages = [Message("user", "<image>\nDescribe it."), Message("assistant", "red")]
    full = _tokenize(tokenizer, messages, 16)
    first_supervised = next(i for i, t in enumerate(full.labels) if t != IGNORE_INDEX)
    with pytest.raises(SampleRejected) as info:
        _tokenize(tokenizer, messages, 16, max_length=first_supervised)
    assert info.value.kind == "no_supervised_tokens"
    assert _tokenize(tokenizer, messages, 16, max_length=first_supervised + 1).labels[-1] != IGNORE_INDEX
