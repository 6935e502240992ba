"""The supervised-rows head (``llava/model/supervised_head.py``) computes the stock loss and gradients.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/model/test_supervised_head.py

References are independent: ``F.cross_entropy(F.linear(...))`` for the fused function, and transformers' own
``LlavaForConditionalGeneration`` head + ``ForCausalLMLoss`` (the model with the head switched off) for training
steps: padded and packed batches, gradient accumulation through ``num_items_in_batch``, LoRA, and a 2-process ZeRO-3
run against one stock process (fp32, <= 1e-5).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from llava.model.supervised_head import LinearCrossEntropy, supervised_head_loss, use_supervised_head
from llava.train.args import parse_args
from llava.train.train import build_trainer


@pytest.mark.parametrize("with_bias,train_weight", [(True, True), (False, False)])
def test_fused_linear_cross_entropy_equals_reference(with_bias, train_weight):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=g, requires_grad=True)
    weight = torch.randn(37, 8, generator=g, requires_grad=train_weight)
    bias = torch.randn(37, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 37, (11,), generator=g)
    got = LinearCrossEntropy.apply(hidden, weight, bias, targets, 3, torch.float32)  # 4 chunks, the last short
    got_grads = torch.autograd.grad(got * 0.7, [t for t in (hidden, weight, bias) if t is not None and t.requires_grad])
    ref = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.7, [t for t in (hidden, weight, bias) if t is not None and t.requires_grad])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_loss_ignores_unsupervised_rows_and_divides_like_the_stock_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 29, bias=False)
    hidden = torch.randn(2, 6, 8, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, -100, 7], [-100, 5, -100, -100, -100, -100]])
    for num_items in (None, torch.tensor(9)):
        ref = ForCausalLMLoss(head(hidden), labels, 29, num_items_in_batch=num_items)
        torch.testing.assert_close(supervised_head_loss(hidden, head, labels, num_items, chunk_rows=2), ref,
                                   atol=1e-6, rtol=1e-6)
    # bf16 autocast: matmuls in bf16 like the stock head under autocast, softmax in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = ForCausalLMLoss(head(hidden), labels, 29)
        got = supervised_head_loss(hidden, head, labels)
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)


def _trainer(tiny_models, shapes_data, out, *flags):
    argv = ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(shapes_data["stage2_qa"]),
            "--image_folder", str(shapes_data["image_folder"]), "--output_dir", str(out), "--report_to", "none",
            "--model_max_length", "256", "--use_cpu", "True", "--seed", "0", "--max_steps", "1",
            "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2", "--save_strategy", "no",
            "--dataloader_num_workers", "0", "--lora_dropout", "0", *flags]
    model_args, data_args, training_args = parse_args(argv)
    transformers.set_seed(0)
    trainer, _ = build_trainer(model_args, data_args, training_args)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 2
    return trainer


def _accumulated_grads(trainer, batches, num_items) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    losses = [float(trainer.training_step(model, dict(b), num_items)) for b in batches]
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("variant", ["padded", "packed", "lora"])
def test_accumulated_training_step_equals_the_stock_head(tiny_models, shapes_data, tmp_path, variant):
    """Two micro-batches of one optimizer step (``num_items_in_batch`` over both): the per-micro-batch losses and
    every accumulated gradient equal the stock head's (the same model with the head switched off)."""
    flags = {"padded": [], "packed": ["--packing", "True"],
             "lora": ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8"]}[variant]
    trainer = _trainer(tiny_models, shapes_data, tmp_path, *flags)
    model = trainer.model
    if variant == "lora":  # non-zero adapters, so the LoRA path carries gradient into the frozen head's input
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    batches, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, trainer.args.device)
    assert len(batches) == 2 and int(num_items) > 0
    assert ("position_ids" in batches[0]) == (variant == "packed")

    model.train()
    with torch.no_grad():  # the training forward returns the loss in place of logits: no full logits exist
        out = model(**batches[0], num_items_in_batch=num_items)
    assert out.logits.dim() == 0 and torch.equal(out.logits, out.loss)
    losses, grads = _accumulated_grads(trainer, batches, num_items)
    assert use_supervised_head(model, False) is False
    stock_losses, stock_grads = _accumulated_grads(trainer, batches, num_items)
    assert len(grads) == len(stock_grads) > 2 and set(grads) == set(stock_grads)
    assert any("lm_head" in n for n in grads)  # trains in all three (LoRA: new tokens make it a non-LoRA trainable)
    assert any("lora_B" in n for n in grads) == (variant == "lora")
    assert losses == pytest.approx(stock_losses, abs=1e-5)
    for name, grad in grads.items():
        assert float(stock_grads[name].abs().max()) > 0, name
        torch.testing.assert_close(grad, stock_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_eval_and_predict_keep_full_logits(tiny_models, shapes_data, tmp_path):
    trainer = _trainer(tiny_models, shapes_data, tmp_path)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        use_supervised_head(model, False)
        stock = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    torch.testing.assert_close(out.logits, stock.logits, atol=0, rtol=0)
    torch.testing.assert_close(out.loss, stock.loss, atol=0, rtol=0)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_two_ranks_with_the_head_equal_one_stock_process(tiny_models, shapes_data, tmp_path):
    """ZeRO-3 (weights partitioned, the head's weight gathered by DeepSpeed's hooks around it), stage 2 full
    fine-tuning, 2 ranks x batch 2 with the supervised head == 1 process x batch 4 with the stock head: every step's
    loss (each depends on the previous steps' gradients, ``lm_head``'s included) within 1e-5."""
    from llava.train.train import train
    from tests.train.test_distributed import REPO, common, deepspeed, step_losses

    out = tmp_path / "zero3"
    model = ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
             "--version", "vicuna_v1", "--data_path", str(shapes_data["stage2_qa"])]
    run = ["--save_strategy", "no", "--learning_rate", "1e-3"]
    deepspeed(["--module", "llava.train.train"], ["--deepspeed", str(REPO / "zero_configs" / "zero3.json"), *model,
                                                  *common(shapes_data, out, steps=3), *run])
    single = train([*model, *common(shapes_data, tmp_path / "single", steps=3, batch=4), *run, "--use_cpu", "True",
                    "--supervised_head", "False"])
    reference = {e["step"]: e["loss"] for e in single.state.log_history if "loss" in e}
    losses = step_losses(out)
    assert sorted(losses) == [1, 2, 3]
    for step, loss in losses.items():
        assert abs(loss - reference[step]) <= 1e-5, (step, loss, reference[step])
