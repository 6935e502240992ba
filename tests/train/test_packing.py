"""Padding-free packing: the packed batch computes the same loss and logits as the padded one, and trains the same.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/train/test_packing.py

References are the padded batch (``DataCollatorForSupervisedDataset``, its own tests hold it against an independent
cross-entropy) and each sample run alone; the negative controls show that the checks can fail: without the
position-id restart the samples see each other.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils.data import DataLoader

from llava.constants import IGNORE_INDEX
from llava.data.collator import DataCollatorForSupervisedDataset, DataCollatorWithPacking
from llava.data.dataset import LazySupervisedDataset
from llava.data.templates import get_template
from llava.model.builder import apply_freezing, build_llava_model, set_use_cache
from llava.model.packed_attention import PACKED_SDPA, use_packed_sdpa
from llava.train.args import parse_args
from llava.train.lora import setup_lora
from llava.train.throughput import sample_lengths
from llava.train.train import build_trainer


def _item(ids, labels, pixel_values=None):
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixel_values}


def test_packing_collator_rows_positions_labels_and_image_order():
    x1, x2 = torch.full((1, 3, 2, 2), 1.0), torch.full((1, 3, 2, 2), 2.0)
    batch = DataCollatorWithPacking(pad_token_id=0, max_length=6)(
        [_item([1, 5, 9], [-100, 5, 9], x1), _item([1, 7], [7, 7]), _item([1, 8, 8, 4], [-100, -100, 8, 4], x2)]
    )
    assert batch["input_ids"].tolist() == [[1, 5, 9, 1, 7], [1, 8, 8, 4, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 9, -100, 7], [-100, -100, 8, 4, -100]]  # first label of a sample
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert "attention_mask" not in batch
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert sample_lengths(batch, pad_token_id=0) == [3, 2, 4]
    assert DataCollatorWithPacking(pad_token_id=0, max_length=6).rows_of([5, 5, 1, 1]) == [[0, 2], [1, 3]]
    one_row = DataCollatorWithPacking(pad_token_id=0)([_item([1, 2], [1, 2]), _item([1, 3, 4], [1, 3, 4])])
    assert one_row["position_ids"].tolist() == [[0, 1, 0, 1, 2]]
    with pytest.raises(ValueError, match="more than the packing max_length 2"):
        DataCollatorWithPacking(pad_token_id=0, max_length=2)([_item([1, 2, 3], [1, 2, 3])])


@pytest.fixture(scope="module")
def built(tiny_models):
    from llava.train.args import ModelArguments

    built = build_llava_model(
        ModelArguments(model_name_or_path=str(tiny_models["llm"]), vision_tower=str(tiny_models["vision_tower"]))
    )
    set_use_cache(built.model, False)
    return built


@pytest.fixture(scope="module")
def samples(built, shapes_data) -> list[dict]:
    """Two image samples and a text-only one between them, of different lengths."""
    ds = LazySupervisedDataset(shapes_data["stage2_qa"], built.tokenizer, template=get_template("vicuna_v1"),
                               image_processor=built.image_processor, image_folder=shapes_data["image_folder"],
                               image_token_id=built.image_token_id, num_image_tokens=built.num_image_tokens,
                               model_max_length=512, show_progress=False)
    with_image = [i for i, n in enumerate(ds.modality_lengths) if n > 0]
    text_only = [i for i, n in enumerate(ds.modality_lengths) if n < 0][:1]
    longer = max(with_image[1:], key=lambda i: ds.lengths[i])
    items = [ds[with_image[0]], ds[text_only[0]], ds[longer]]
    assert len({len(x["input_ids"]) for x in items}) > 1
    return items


@pytest.fixture(scope="module")
def image_samples(built, shapes_data, samples) -> list[dict]:
    """Three image samples, the middle one strictly longest, so balanced rows put samples 0 and 2 in one row."""
    a, b = samples[0], samples[2]
    if len(a["input_ids"]) == len(b["input_ids"]):
        pytest.skip("no two image samples of different lengths")
    short, long = sorted((a, b), key=lambda x: len(x["input_ids"]))
    flipped = {**short, "pixel_values": short["pixel_values"].flip(-1)}  # a different image, same tokens
    return [short, long, flipped]


def _per_sample_logits(model, batch, spans):
    with torch.no_grad():
        logits = model(**batch).logits
    return [logits[r, a:b] for r, a, b in spans]


def _spans(samples, rows_of):
    spans = []
    for r, row in enumerate(rows_of):
        start = 0
        for i in row:
            spans.append((r, start, start + len(samples[i]["input_ids"])))
            start += len(samples[i]["input_ids"])
    return spans


def set_lm_attention(model, name: str) -> None:
    """The language model holds its own config object, so it is set directly (and checked)."""
    if name == PACKED_SDPA:
        use_packed_sdpa(model)
    else:
        use_packed_sdpa(model, False)
        model.model.language_model.set_attn_implementation(name)
    assert model.model.language_model.config._attn_implementation == name


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
def test_packed_loss_and_logits_equal_padded(built, samples, attn):
    model = built.model.eval()
    set_lm_attention(model, attn)
    pad = built.tokenizer.pad_token_id
    padded = DataCollatorForSupervisedDataset(pad_token_id=pad)(samples)
    packed = DataCollatorWithPacking(pad_token_id=pad)(samples)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=0)
    ref = _per_sample_logits(model, padded, [(r, 0, len(x["input_ids"])) for r, x in enumerate(samples)])
    got = _per_sample_logits(model, packed, _spans(samples, [[0, 1, 2]]))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # two rows (a max_length that splits the batch) give the same loss too
    split = DataCollatorWithPacking(pad_token_id=pad, max_length=len(samples[0]["input_ids"]) + len(samples[1]["input_ids"]))
    two_rows = split(samples)
    assert two_rows["input_ids"].shape[0] == 2
    with torch.no_grad():
        torch.testing.assert_close(model(**two_rows).loss, loss_padded, atol=1e-5, rtol=0)
    set_lm_attention(model, "sdpa")


@pytest.mark.parametrize("attn", ["sdpa", PACKED_SDPA])
def test_images_follow_their_tokens_when_rows_reorder_samples(built, image_samples, attn):
    model = built.model.eval()
    set_lm_attention(model, attn)
    pad = built.tokenizer.pad_token_id
    n = [len(x["input_ids"]) for x in image_samples]
    collate = DataCollatorWithPacking(pad_token_id=pad, max_length=max(n[1], n[0] + n[2]))
    assert collate.rows_of(n) == [[0, 2], [1]]
    packed = collate(image_samples)
    assert torch.equal(packed["pixel_values"][1], image_samples[2]["pixel_values"][0])  # token order: 0, 2, 1
    with torch.no_grad():
        loss_padded = model(**DataCollatorForSupervisedDataset(pad_token_id=pad)(image_samples)).loss
        torch.testing.assert_close(model(**packed).loss, loss_padded, atol=1e-5, rtol=0)
        wrong = {**packed, "pixel_values": torch.cat([x["pixel_values"] for x in image_samples])}  # batch order
        assert abs(model(**wrong).loss - loss_padded) > 1e-4
    set_lm_attention(model, "sdpa")


@pytest.mark.parametrize("attn", ["sdpa", PACKED_SDPA])
def test_negative_control_without_position_restart_samples_attend_across(built, samples, attn):
    model = built.model.eval()
    set_lm_attention(model, attn)
    packed = DataCollatorWithPacking(pad_token_id=built.tokenizer.pad_token_id)(samples)
    padded = DataCollatorForSupervisedDataset(pad_token_id=built.tokenizer.pad_token_id)(samples)
    plain = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}  # one long causal sequence
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_plain = model(**plain).loss
    assert abs(loss_plain - loss_padded) > 1e-3
    second = _spans(samples, [[0, 1, 2]])[1]
    ref = _per_sample_logits(model, padded, [(1, 0, len(samples[1]["input_ids"]))])[0]
    assert (_per_sample_logits(model, plain, [second])[0] - ref).abs().max() > 1e-3
    set_lm_attention(model, "sdpa")


def test_packed_loss_equals_padded_with_lora(tiny_models, samples):
    from types import SimpleNamespace

    from llava.train.args import ModelArguments

    args = ModelArguments(model_name_or_path=str(tiny_models["llm"]), vision_tower=str(tiny_models["vision_tower"]))
    built = build_llava_model(args)
    apply_freezing(built.model, args, added_tokens=built.added_tokens)
    set_use_cache(built.model, False)
    lora = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none", bits=16)
    model = setup_lora(built.model, args, lora, added_tokens=built.added_tokens)
    for name, p in model.named_parameters():  # non-zero adapters, so the check covers the LoRA path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    pad = built.tokenizer.pad_token_id
    loss_padded = model(**DataCollatorForSupervisedDataset(pad_token_id=pad)(samples)).loss
    loss_packed = model(**DataCollatorWithPacking(pad_token_id=pad)(samples)).loss
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=0)
    use_packed_sdpa(model)  # on the PEFT wrapper, as train.py does on the base model
    loss_per_sample = model(**DataCollatorWithPacking(pad_token_id=pad)(samples)).loss
    torch.testing.assert_close(loss_per_sample, loss_padded, atol=1e-5, rtol=0)


def _trainer(tiny_models, shapes_data, out, *flags):
    argv = ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(shapes_data["stage2_qa"]),
            "--image_folder", str(shapes_data["image_folder"]), "--output_dir", str(out), "--report_to", "none",
            "--model_max_length", "256", "--use_cpu", "True", "--seed", "0", "--max_steps", "1",
            "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--save_strategy", "no",
            "--max_grad_norm", "0", "--dataloader_num_workers", "0", *flags]
    model_args, data_args, training_args = parse_args(argv)
    transformers.set_seed(0)  # the new tokens' embedding rows are drawn at random
    trainer, built = build_trainer(model_args, data_args, training_args)
    expected = PACKED_SDPA if training_args.packing_attention == "per_sample" and training_args.packing else "sdpa"
    assert built.model.model.language_model.config._attn_implementation == expected
    return trainer


def test_packed_accumulated_step_equals_padded_full_batch(tiny_models, shapes_data, tmp_path):
    """SGD step: packed 2 x 4 accumulation (rows of unequal token counts) == padded batch of 8 in one pass, so the
    loss is the global per-token mean through ``num_items_in_batch``, not a mean of per-row or per-micro-batch means."""
    padded = _trainer(tiny_models, shapes_data, tmp_path / "b", "--per_device_train_batch_size", "8")
    before = {n: p.detach().clone() for n, p in padded.model.named_parameters() if p.requires_grad}
    padded.train()
    b = dict(padded.model.named_parameters())
    assert max(float((b[n].detach() - before[n]).abs().max()) for n in before) > 1e-3
    for attention in ("mask", "per_sample"):
        packed = _trainer(tiny_models, shapes_data, tmp_path / attention, "--packing", "True", "--packing_attention",
                          attention, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4")
        assert packed.model_accepts_loss_kwargs
        packed.train()
        for name, p in packed.model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p, b[name], atol=2e-6, rtol=1e-4)
    # negative control: a mean per micro-batch (no num_items_in_batch), averaged over the 4 steps, trains differently
    per_micro = _trainer(tiny_models, shapes_data, tmp_path / "c", "--packing", "True",
                         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4")
    per_micro.model_accepts_loss_kwargs = False
    per_micro.train()
    c = dict(per_micro.model.named_parameters())
    assert max(float((c[n] - b[n]).detach().abs().max()) for n in before) > 1e-4


def test_per_sample_packing_makes_one_row_per_batch_and_the_masked_row_keeps_max_length(tiny_models, shapes_data,
                                                                                         tmp_path):
    """With the per-sample attention a micro-batch is one row (no tail padding); the masked row keeps rows of at most
    --model_max_length (its mask grows with the square of the row)."""
    one = _trainer(tiny_models, shapes_data, tmp_path / "a", "--packing", "True", "--per_device_train_batch_size", "8",
                   "--model_max_length", "128")
    assert one.data_collator.max_length is None
    batch = next(iter(one.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] > 128  # 8 samples past max length
    assert (batch["labels"] != -100).any() and int((batch["position_ids"] == 0).sum()) == 8  # 8 samples, no pad run
    masked = _trainer(tiny_models, shapes_data, tmp_path / "b", "--packing", "True", "--packing_attention", "mask",
                      "--per_device_train_batch_size", "8", "--model_max_length", "128")
    assert masked.data_collator.max_length == 128
    batch = next(iter(masked.get_train_dataloader()))
    assert batch["input_ids"].shape[0] > 1 and batch["input_ids"].shape[1] <= 128


def test_packing_flag_checks_attention_implementation(tiny_models, shapes_data, tmp_path):
    with pytest.raises(ValueError, match="--packing .* --attn_implementation sdpa, eager"):
        parse_args(["--model_name_or_path", "x", "--data_path", "d.json", "--output_dir", str(tmp_path),
                    "--packing", "True", "--attn_implementation", "flex_attention"])


def test_dataset_and_packing_collator_work_in_dataloader_workers(built, shapes_data):
    ds = LazySupervisedDataset(shapes_data["stage2_qa"], built.tokenizer, template=get_template("vicuna_v1"),
                               image_processor=built.image_processor, image_folder=shapes_data["image_folder"],
                               image_token_id=built.image_token_id, num_image_tokens=built.num_image_tokens,
                               model_max_length=256, show_progress=False)
    collate = DataCollatorWithPacking(built.tokenizer.pad_token_id, max_length=256)
    subset = torch.utils.data.Subset(ds, range(8))
    in_main = list(DataLoader(subset, batch_size=4, collate_fn=collate, num_workers=0))
    in_workers = list(DataLoader(subset, batch_size=4, collate_fn=collate, num_workers=2))
    for a, b in zip(in_main, in_workers):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert (in_main[0]["labels"] != IGNORE_INDEX).any()


def test_train_entry_point_with_lora_and_packing(tiny_models, shapes_data, tmp_path):
    """``llava train --lora_enable --packing`` runs end to end, logs finite losses, and saves a LoRA adapter; the model
    is switched back to stock sdpa before saving, so the output needs nothing of ours to load."""
    from llava.train.train import train

    trainer = train(["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
                     "--version", "vicuna_v1", "--data_path", str(shapes_data["stage2_qa"]),
                     "--image_folder", str(shapes_data["image_folder"]), "--output_dir", str(tmp_path),
                     "--report_to", "none", "--model_max_length", "256", "--use_cpu", "True", "--seed", "0",
                     "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
                     "--lora_enable", "True", "--lora_r", "4", "--packing", "True", "--save_strategy", "no"])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    base = trainer.model.get_base_model()
    assert base.model.language_model.config._attn_implementation == "sdpa"


def test_packed_rows_get_no_mask_and_sample_sizes_once_per_forward(built, samples, monkeypatch):
    """The block-diagonal 4-D mask the per-sample attention never reads is not built for packed rows, while a padded
    batch gets ``sdpa``'s mask unchanged; the sample sizes are found once per forward, not once per layer."""
    import copy

    from transformers.masking_utils import create_causal_mask

    from llava.model import packed_attention

    model = built.model.eval()
    set_lm_attention(model, PACKED_SDPA)
    lm = model.model.language_model
    sdpa_config = copy.copy(lm.config)
    sdpa_config._attn_implementation = "sdpa"
    pad = built.tokenizer.pad_token_id
    packed = DataCollatorWithPacking(pad_token_id=pad)(samples)
    padded = DataCollatorForSupervisedDataset(pad_token_id=pad)(samples)
    for batch, packed_rows in ((packed, True), (padded, False)):
        embeds = torch.zeros(*batch["input_ids"].shape, lm.config.hidden_size)
        mask_args = dict(inputs_embeds=embeds, attention_mask=batch.get("attention_mask"), past_key_values=None,
                         position_ids=batch.get("position_ids"))
        ours = create_causal_mask(config=lm.config, **mask_args)
        stock = create_causal_mask(config=sdpa_config, **mask_args)
        assert stock is not None and stock.dim() == 4  # sdpa: a block-diagonal / padding mask
        if packed_rows:
            assert ours is None
        else:
            assert torch.equal(ours, stock)
    assert packed_attention.sample_sizes(packed["position_ids"]) == [[len(x["input_ids"]) for x in samples]]
    assert packed_attention.sample_sizes(torch.arange(5)[None]) is None
    assert packed_attention.sample_sizes(torch.tensor([[0, 1, 2, 5, 6]]), 2) == [[3, 2], [3, 2]]  # transformers' rule
    calls = []
    real = packed_attention.sample_sizes
    monkeypatch.setattr(packed_attention, "sample_sizes", lambda *a: calls.append(a) or real(*a))
    with torch.no_grad():
        model(**packed)
    assert lm.config.num_hidden_layers > 1 and len(calls) == 1
    set_lm_attention(model, "sdpa")
    with torch.no_grad():
        model(**packed)
    assert len(calls) == 1  # switched back: the hook is gone


def test_generation_with_packed_sdpa_equals_sdpa(built, samples):
    """Left-padded generation with a cache takes the masked ``sdpa`` path unchanged under ``llava_packed_sdpa``."""
    model = built.model.eval()
    pad = built.tokenizer.pad_token_id
    prompts = [samples[1]["input_ids"][:n] for n in (12, 7)]  # the text-only sample
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(p)] for p in prompts])).long()
    set_use_cache(model, True)
    try:
        out = {}
        for attn in ("sdpa", PACKED_SDPA):
            set_lm_attention(model, attn)
            with torch.no_grad():
                out[attn] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                           pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out["sdpa"].sequences, out[PACKED_SDPA].sequences)
        for a, b in zip(out["sdpa"].logits, out[PACKED_SDPA].logits):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    finally:
        set_use_cache(model, False)
        set_lm_attention(model, "sdpa")
