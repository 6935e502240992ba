"""Right-padded training batches without the padding mask (``llava/model/causal_padding.py``) train the same.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/model/test_causal_padding.py

The reference is the same model with the hook switched off: transformers' stock masked ``sdpa`` forward. A spy on
``scaled_dot_product_attention`` shows what changed (no mask, causal, grouped-query heads without copies); the
negative controls show where dropping the mask would be wrong (left padding) and that the hook declines there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from llava.constants import IGNORE_INDEX
from llava.model.causal_padding import is_right_padding, use_causal_padding
from llava.train.args import parse_args
from llava.train.train import build_trainer


def test_is_right_padding():
    assert is_right_padding(torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]))
    assert not is_right_padding(torch.tensor([[1, 1, 0], [0, 1, 1]]))  # left padding
    assert not is_right_padding(torch.tensor([[1, 0, 1]]))  # a hole


def _trainer(tiny_models, shapes_data, out, *flags):
    argv = ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(shapes_data["stage2_qa"]),
            "--image_folder", str(shapes_data["image_folder"]), "--output_dir", str(out), "--report_to", "none",
            "--model_max_length", "256", "--use_cpu", "True", "--seed", "0", "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--save_strategy", "no", "--dataloader_num_workers", "0",
            "--lora_dropout", "0", *flags]
    model_args, data_args, training_args = parse_args(argv)
    transformers.set_seed(0)
    trainer, _ = build_trainer(model_args, data_args, training_args)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


class SdpaSpy:
    """Records ``(attn_mask is None, is_causal, enable_gqa)`` of the language model's SDPA calls: those whose query
    is ``length`` tokens long (the vision tower's are its patch count)."""

    def __init__(self, monkeypatch, length: int):
        self.length = length
        self.calls: list[tuple[bool, bool, bool]] = []
        real = F.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if query.shape[2] == self.length:
                self.calls.append((attn_mask is None, bool(is_causal), bool(enable_gqa)))
            return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    loss = float(trainer.training_step(model, dict(batch)))
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("variant", ["padded", "stock_head", "lora"])
def test_training_step_equals_the_masked_forward(tiny_models, shapes_data, tmp_path, monkeypatch, variant):
    flags = {"padded": [], "stock_head": ["--supervised_head", "False"],
             "lora": ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8"]}[variant]
    trainer = _trainer(tiny_models, shapes_data, tmp_path, *flags)
    model = trainer.model
    if variant == "lora":  # non-zero adapters, so gradient flows through them
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    batch = next(iter(trainer.get_train_dataloader()))
    mask = batch["attention_mask"]
    assert bool((mask == 0).any()) and is_right_padding(mask)  # a padded batch, padded on the right
    text = model.get_base_model().config.text_config if variant == "lora" else model.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads  # grouped-query heads: enable_gqa is exercised
    spy = SdpaSpy(monkeypatch, mask.shape[1])

    loss, grads = _loss_and_grads(trainer, batch)
    assert spy.calls and all(c == (True, True, True) for c in spy.calls), spy.calls  # unmasked, causal, GQA
    spy.calls.clear()
    assert use_causal_padding(model, False) is False
    stock_loss, stock_grads = _loss_and_grads(trainer, batch)
    assert spy.calls and all(c == (False, False, False) for c in spy.calls), spy.calls  # the stock masked call

    assert len(grads) == len(stock_grads) > 2 and set(grads) == set(stock_grads)
    assert loss == pytest.approx(stock_loss, abs=1e-5)
    for name, grad in grads.items():
        assert float(stock_grads[name].abs().max()) > 0, name
        torch.testing.assert_close(grad, stock_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_mask_kept_where_it_matters(tiny_models, shapes_data, tmp_path, monkeypatch):
    """Left padding, labels on padded positions and eval keep the mask; with left padding dropping it would change
    the loss (negative control: the guard is needed)."""
    trainer = _trainer(tiny_models, shapes_data, tmp_path)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    spy = SdpaSpy(monkeypatch, batch["input_ids"].shape[1])
    lengths = batch["attention_mask"].sum(-1).tolist()
    left = {k: v.clone() for k, v in batch.items()}
    for row, n in enumerate(lengths):  # the same rows padded on the left
        for key in ("input_ids", "labels", "attention_mask"):
            left[key][row] = torch.roll(batch[key][row], shifts=batch[key].shape[1] - n)
    assert not is_right_padding(left["attention_mask"])
    model.train()
    with torch.no_grad():
        kept = model(**left).loss
        assert spy.calls and not any(no_mask for no_mask, _, _ in spy.calls)
        use_causal_padding(model, False)
        assert torch.equal(kept, model(**left).loss)
        dropped = model(**{**left, "attention_mask": None}).loss
        assert abs(float(dropped) - float(kept)) > 1e-3  # pads before real tokens: the mask is needed

        use_causal_padding(model)
        spy.calls.clear()
        pads = batch["attention_mask"] == 0
        assert bool((batch["labels"][pads] == IGNORE_INDEX).all())
        labelled_pads = {**batch, "labels": batch["labels"].masked_fill(pads, 5)}
        model(**labelled_pads)
        assert spy.calls and not any(no_mask for no_mask, _, _ in spy.calls)
        spy.calls.clear()
        model.eval()
        model(**batch)
        assert spy.calls and not any(no_mask for no_mask, _, _ in spy.calls)
