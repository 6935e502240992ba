"""Batch collation and the loss it feeds: `pytest tests/data/test_collator.py`.

Padding and image order are checked on hand-made tensors; a collated batch of real dataset items is run through
the real ``LlavaForConditionalGeneration`` and its loss compared with a cross-entropy computed here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llava.constants import IGNORE_INDEX
from llava.data.collator import DataCollatorForSupervisedDataset
from llava.data.dataset import LazySupervisedDataset
from llava.data.templates import get_template


def _item(ids, labels, pixel_values=None):
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixel_values}


def test_padding_values_and_attention_mask():
    batch = DataCollatorForSupervisedDataset(pad_token_id=3)([_item([1, 5, 9], [-100, 5, 9]), _item([1, 7], [-100, 7])])
    assert batch["input_ids"].tolist() == [[1, 5, 9], [1, 7, 3]]
    assert batch["labels"].tolist() == [[-100, 5, 9], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert "pixel_values" not in batch
    padded = DataCollatorForSupervisedDataset(pad_token_id=0, pad_to_multiple_of=4)([_item([1, 2, 3, 4, 5], [1] * 5)])
    assert padded["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert padded["labels"].tolist() == [[1] * 5 + [IGNORE_INDEX] * 3]
    assert padded["attention_mask"].tolist() == [[1] * 5 + [0] * 3]


def test_pixel_values_concatenated_in_batch_order():
    def images(*fills):
        return torch.stack([torch.full((3, 4, 4), float(f)) for f in fills])

    batch = DataCollatorForSupervisedDataset(pad_token_id=0)(
        [_item([1], [1], images(1, 2)), _item([1], [1]), _item([1], [1], images(3))]
    )
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]


@pytest.fixture(scope="module")
def built(tiny_models):
    from llava.model.builder import build_llava_model
    from llava.train.args import ModelArguments

    return build_llava_model(
        ModelArguments(model_name_or_path=str(tiny_models["llm"]), vision_tower=str(tiny_models["vision_tower"]))
    )


def test_collated_batch_loss_equals_independent_cross_entropy(built, shapes_data):
    ds = LazySupervisedDataset(
        shapes_data["stage2_qa"],
        built.tokenizer,
        template=get_template("vicuna_v1"),
        image_processor=built.image_processor,
        image_folder=shapes_data["image_folder"],
        image_token_id=built.image_token_id,
        num_image_tokens=built.num_image_tokens,
        model_max_length=512,
        show_progress=False,
    )
    with_image = [i for i, n in enumerate(ds.modality_lengths) if n > 0][:2]
    text_only = [i for i, n in enumerate(ds.modality_lengths) if n < 0][:1]
    assert len(with_image) == 2 and len(text_only) == 1
    items = [ds[i] for i in (with_image[0], text_only[0], with_image[1])]
    batch = DataCollatorForSupervisedDataset(pad_token_id=built.tokenizer.pad_token_id)(items)
    assert batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["pixel_values"][0], items[0]["pixel_values"][0])
    assert torch.equal(batch["pixel_values"][1], items[2]["pixel_values"][0])

    model = built.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():  # non-trivial image features in the loss
            p.normal_(0, 0.5)
        out = model(**batch)
        logits = out.logits.float()
    labels = batch["labels"]
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    keep = shifted_labels != IGNORE_INDEX
    log_probs = torch.log_softmax(shifted_logits[keep], dim=-1)
    expected = -log_probs.gather(1, shifted_labels[keep][:, None]).mean()
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert int(keep.sum()) == sum(
        int((x["labels"] != IGNORE_INDEX).sum()) - int(x["labels"][0] != IGNORE_INDEX) for x in items
    )
    # the images reach the logits: a different image changes the loss
    with torch.no_grad():
        other = model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)}).loss
    assert not torch.isclose(other, out.loss)
    assert F.cross_entropy(
        shifted_logits.reshape(-1, logits.shape[-1]), shifted_labels.reshape(-1)
    ).item() == pytest.approx(expected.item(), rel=1e-5)
