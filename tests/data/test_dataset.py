"""LazySupervisedDataset on JSON, JSONL and `datasets` sources: `pytest tests/data/test_dataset.py`.

Images are drawn in tmp_path with known colours; ``pad`` vs ``square`` pixel values are checked against a
NumPy computation with the processor's mean/std; lengths, modality lengths and drop/skip accounting are checked
against hand-counted records.
"""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from llava.constants import IGNORE_INDEX
from llava.data.dataset import DataError, LazySupervisedDataset
from llava.data.templates import get_template
from llava.model.builder import add_multimodal_tokens

N_IMAGE_TOKENS = 16  # tiny CLIP: (64 / 16) ** 2 patches, CLS dropped
COLOUR = (200, 30, 60)


def _conv(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


RECORDS = [
    {"id": "one", "images": ["square.png"], "conversations": _conv("<image>\nWhat colour?", "red")},
    {"id": "two", "images": ["square.png", "wide.png"], "conversations": _conv("<image> <image>\nSame?", "three")},
    {"id": "none", "images": [], "conversations": _conv("What is 2 plus 1?", "three")},
]


@pytest.fixture(scope="module")
def parts(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    add_multimodal_tokens(tok, False)
    return tok, AutoImageProcessor.from_pretrained(tiny_models["vision_tower"])


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "square.png")
    Image.new("RGB", (64, 32), COLOUR).save(tmp_path / "wide.png")  # width 64, height 32
    return tmp_path


def _write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def _dataset(parts, data_path, folder, **kwargs):
    tok, processor = parts
    options = dict(
        template=get_template("vicuna_v1"),
        image_processor=processor,
        image_folder=folder,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        num_image_tokens=N_IMAGE_TOKENS,
        model_max_length=512,
        show_progress=False,
    )
    options.update(kwargs)
    return LazySupervisedDataset(data_path, tok, **options)


def test_json_jsonl_and_datasets_dir_give_identical_items(parts, folder):
    json_path = _write_json(folder / "data.json", RECORDS)
    jsonl_path = folder / "data.jsonl"
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(folder / "hf"))
    built = [_dataset(parts, p, folder) for p in (json_path, jsonl_path, folder / "hf")]
    assert [len(ds) for ds in built] == [3, 3, 3]
    for i in range(3):
        items = [ds[i] for ds in built]
        for item in items[1:]:
            assert torch.equal(item["input_ids"], items[0]["input_ids"])
            assert torch.equal(item["labels"], items[0]["labels"])
            if items[0]["pixel_values"] is None:
                assert item["pixel_values"] is None
            else:
                assert torch.equal(item["pixel_values"], items[0]["pixel_values"])


def test_items_for_one_two_and_no_image(parts, folder):
    tok, _ = parts
    ds = _dataset(parts, _write_json(folder / "d.json", RECORDS), folder)
    image_id = tok.convert_tokens_to_ids("<image>")
    for i, n_images in enumerate([1, 2, 0]):
        item = ds[i]
        assert item["input_ids"].dtype == torch.long and item["labels"].shape == item["input_ids"].shape
        assert int((item["input_ids"] == image_id).sum()) == n_images * N_IMAGE_TOKENS
        assert bool((item["labels"][item["input_ids"] == image_id] == IGNORE_INDEX).all())
        if n_images:
            assert tuple(item["pixel_values"].shape) == (n_images, 3, 64, 64)
        else:
            assert item["pixel_values"] is None
    assert ds.lengths == [len(ds[i]["input_ids"]) for i in range(3)]
    assert ds.modality_lengths == [ds.lengths[0], ds.lengths[1], -ds.lengths[2]]
    assert ds.lengths[1] - ds.lengths[0] == N_IMAGE_TOKENS + 1 + len(
        tok(" Same? ASSISTANT: three</s>")["input_ids"]
    ) - len(tok("\nWhat colour? ASSISTANT: red</s>")["input_ids"])


def _normalise(rgb: np.ndarray, processor) -> np.ndarray:
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    return ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_pad_adds_mean_colour_bars_square_stretches(parts, folder, aspect):
    _, processor = parts
    records = [{"id": "w", "image": "wide.png", "conversations": _conv("<image>\nColour?", "red")}]
    ds = _dataset(parts, _write_json(folder / "w.json", records), folder, image_aspect_ratio=aspect)
    pixels = ds[0]["pixel_values"][0].numpy()
    expected_rgb = np.empty((64, 64, 3))
    expected_rgb[:] = COLOUR
    if aspect == "pad":  # 64x32 centred on a 64x64 canvas of the mean colour: bars of 16 rows above and below
        bar = [int(m * 255) for m in processor.image_mean]
        expected_rgb[:16] = bar
        expected_rgb[48:] = bar
    np.testing.assert_allclose(pixels, _normalise(expected_rgb, processor), atol=1e-4)


def test_samples_that_cannot_train_are_dropped_and_counted(parts, folder):
    # plain: "<s>" + 16 image tokens + caption; at max 17 the caption is cut, at max 10 the image itself is cut
    records = [
        {"id": "img", "image": "square.png", "conversations": _conv("<image>\nCaption?", "red")},
        {"id": "txt", "conversations": _conv("Caption?", "three")},
    ]
    path = _write_json(folder / "c.json", records)
    for max_length, kind in [(17, "no_supervised_tokens"), (10, "image_tokens_exceed_max_length")]:
        ds = _dataset(parts, path, folder, template=get_template("plain"), model_max_length=max_length)
        assert len(ds) == 1 and ds.record(0).id == "txt"
        assert dict(ds.dropped.counts) == {kind: 1}
        assert ds.modality_lengths == [-ds.lengths[0]]
    ds = _dataset(parts, path, folder, template=get_template("plain"), model_max_length=18)
    assert len(ds) == 2 and not ds.dropped.counts


def test_bad_record_errors_or_is_skipped(parts, folder):
    bad = {"id": "bad", "conversations": _conv("<image>\nno image listed", "red")}
    path = _write_json(folder / "b.json", [*RECORDS, bad])
    with pytest.raises(DataError) as info:
        _dataset(parts, path, folder)
    assert "image_token_mismatch" in str(info.value) and "'bad'" in str(info.value)
    ds = _dataset(parts, path, folder, on_bad_sample="skip")
    assert len(ds) == 3 and dict(ds.problems.counts) == {"image_token_mismatch": 1}
    assert [ds.record(i).id for i in range(3)] == ["one", "two", "none"]


def test_from_args_with_built_model(tiny_models, folder):
    from llava.model.builder import build_llava_model
    from llava.train.args import DataArguments, ModelArguments, TrainingArguments

    model_args = ModelArguments(
        model_name_or_path=str(tiny_models["llm"]),
        vision_tower=str(tiny_models["vision_tower"]),
        version="chatml",
        mm_use_im_start_end=True,
    )
    data_path = _write_json(folder / "a.json", RECORDS)
    data_args = DataArguments(data_path=str(data_path), image_folder=str(folder), image_aspect_ratio="pad")
    training_args = TrainingArguments(output_dir=str(folder / "out"), model_max_length=256, report_to=[])
    built = build_llava_model(model_args)
    ds = LazySupervisedDataset.from_args(
        data_path, model_args, data_args, training_args, built, get_template("chatml"), show_progress=False
    )
    tok = built.tokenizer
    ids = ds[1]["input_ids"].tolist()
    assert ids.count(built.image_token_id) == 2 * N_IMAGE_TOKENS == 2 * built.num_image_tokens
    assert ids.count(tok.convert_tokens_to_ids("<im_start>")) == 2
    assert tok.decode([t for t in ds[1]["labels"].tolist() if t != IGNORE_INDEX]) == "three<|im_end|>"
