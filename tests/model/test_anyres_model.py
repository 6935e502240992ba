"""Native LlavaNext / LlavaOnevision composed from a tiny tower + LLM: `pytest tests/model/test_anyres_model.py`.

The native models raise "Image features and image tokens do not match" when a count is off, so a forward over a batch
of every image size (incl. 12x300, 300x12, 700x500, a two-image record and a text-only one) checks the dataset's token
accounting against the features the native forward produces; the ids of a templated sample are compared with the
native processor's for the same prompt; packed and padded batches give the same loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from llava.data.collator import DataCollatorForSupervisedDataset, DataCollatorWithPacking
from llava.data.dataset import LazySupervisedDataset
from llava.data.templates import get_template
from llava.model.builder import apply_freezing, build_llava_model, set_use_cache
from llava.train.args import DataArguments, ModelArguments, TrainingArguments

CASES = {  # name: (tower key, --image_aspect_ratio, --image_grid_pinpoints, native class)
    "next_clip": ("vision_tower", "anyres", "(1x1),...,(3x3)", "LlavaNextForConditionalGeneration"),
    "next_default_grids": ("vision_tower", "anyres", None, "LlavaNextForConditionalGeneration"),
    "onevision_clip_max2": ("vision_tower", "anyres_max_2", "(1x1),...,(3x3)", "LlavaOnevisionForConditionalGeneration"),
    "onevision_siglip_max9": ("siglip_tower", "anyres_max_9", None, "LlavaOnevisionForConditionalGeneration"),
}


def build(tiny_models, anyres_data, name):
    tower, ratio, pinpoints, _ = CASES[name]
    model_args = ModelArguments(model_name_or_path=str(tiny_models["llm"]), vision_tower=str(tiny_models[tower]),
                                mm_patch_merge_type="spatial_unpad")
    data_args = DataArguments(data_path=str(anyres_data["train"]), image_folder=str(anyres_data["image_folder"]),
                              image_aspect_ratio=ratio, image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    built = build_llava_model(model_args, data_args=data_args)
    training_args = TrainingArguments(output_dir="unused", model_max_length=4096, report_to=[], use_cpu=True)
    dataset = LazySupervisedDataset.from_args(data_args.data_path, model_args, data_args, training_args, built,
                                              get_template("vicuna_v1"), show_progress=False)
    return built, dataset


@pytest.mark.parametrize("name", list(CASES))
def test_native_forward_accepts_every_size_and_packing_matches_padding(tiny_models, anyres_data, name):
    built, dataset = build(tiny_models, anyres_data, name)
    model = built.model.eval()
    assert type(model).__name__ == CASES[name][3]
    set_use_cache(model, False)
    per_sample = bool(built.layout.max_num_patches)
    items = [dataset[i] for i in range(len(dataset))]
    padded = DataCollatorForSupervisedDataset(built.tokenizer.pad_token_id, batch_num_images=per_sample)(items)
    packed = DataCollatorWithPacking(built.tokenizer.pad_token_id, max_length=None, batch_num_images=per_sample)(items)
    image_id = built.image_token_id
    counts = [int((x["input_ids"] == image_id).sum()) for x in items]
    assert len(set(counts)) > 5  # sizes give different counts
    with torch.no_grad():
        out = model(**padded)  # raises if any image's token count differs from its features
        features = model.model.get_image_features(
            padded["pixel_values"], padded["image_sizes"],
            **({"batch_num_images": padded["batch_num_images"]} if per_sample else {})).pooler_output
        packed_loss = model(**packed).loss
    # per image: features of the native forward == the image tokens our dataset placed, record by record
    per_image = [f.shape[0] for f in features]
    expected = []
    for i in range(len(dataset)):
        record = dataset.record(i)
        if record.images:
            sizes = [tuple(s) for s in items[i]["image_sizes"].tolist()]
            expected += built.layout.record_image_tokens(sizes)
            assert sum(built.layout.record_image_tokens(sizes)) == counts[i]
    assert per_image == expected
    torch.testing.assert_close(packed_loss, out.loss, rtol=1e-5, atol=1e-5)


def test_image_newline_created_as_llava_next_and_trains_with_projector(tiny_models, anyres_data):
    built, _ = build(tiny_models, anyres_data, "next_clip")
    newline = built.model.model.image_newline
    hidden = built.model.config.text_config.hidden_size
    assert newline.shape == (hidden,)
    assert 0.5 / math.sqrt(hidden) < newline.std().item() < 1.5 / math.sqrt(hidden)  # randn * 1/sqrt(hidden)
    stage1 = ModelArguments(model_name_or_path="x", vision_tower="y", tune_mm_mlp_adapter=True)
    counts = apply_freezing(built.model, stage1)
    assert newline.requires_grad and counts["image_newline"] == hidden
    assert counts["language_model"] == 0 and counts["vision_tower"] == 0
    frozen = ModelArguments(model_name_or_path="x", vision_tower="y", freeze_mm_mlp_adapter=True)
    assert apply_freezing(built.model, frozen)["image_newline"] == 0 and not newline.requires_grad


def test_input_ids_equal_native_processor_for_templated_sample(tiny_models, anyres_data):
    """Our dataset's ids for a record == the native processor's ids for the same rendered prompt and image."""
    from PIL import Image

    for name in ("next_clip", "next_default_grids"):
        built, dataset = build(tiny_models, anyres_data, name)
        template = get_template("vicuna_v1")
        for i in (0, 1, 2, 5):
            record = dataset.record(i)
            text = "".join(s.text for s in template.render_with_tokenizer(record.messages, built.tokenizer))
            image = Image.open(anyres_data["image_folder"] / record.images[0]).convert("RGB")
            native = built.processor(images=[image], text=text, add_special_tokens=False, return_tensors="pt")
            item = dataset[i]
            assert item["input_ids"].tolist() == native["input_ids"][0].tolist()
            torch.testing.assert_close(item["pixel_values"], native["pixel_values"], rtol=0, atol=0)
            assert item["image_sizes"].tolist() == native["image_sizes"].tolist()


def test_data_check_uses_each_images_token_count(tiny_models, anyres_data, capsys):
    """``llava data check`` with the anyres flags: its token lengths are the training dataset's, and its per-image
    counts are the native forward's features (measured above) for the same images."""
    import json

    import numpy as np

    from llava.data_check import check_main

    built, dataset = build(tiny_models, anyres_data, "next_clip")
    capsys.readouterr()  # what building printed (transformers' wandb-offline line on a first import) is not the report
    code = check_main(["--data_path", str(anyres_data["train"]), "--image_folder", str(anyres_data["image_folder"]),
                       "--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
                       "--image_aspect_ratio", "anyres", "--image_grid_pinpoints", "(1x1),...,(3x3)",
                       "--mm_patch_merge_type", "spatial_unpad", "--model_max_length", "4096", "--json"])
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert code == 0
    q = np.percentile(np.asarray(dataset.lengths), [0, 50, 100])
    assert [stats["token_length"][k] for k in ("min", "p50", "max")] == [int(round(x)) for x in q]
    with torch.no_grad():
        items = [dataset[i] for i in range(len(dataset)) if len(dataset.record(i).images) == 1]
        batch = DataCollatorForSupervisedDataset(0)(items)
        features = built.model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    per_image = [f.shape[0] for f in features]
    assert stats["image_tokens_per_image"]["max"] == max(per_image)
    assert stats["image_tokens_per_image"]["min"] == min(per_image)
