"""DPO runs end to end from an SFT checkpoint: the three reference paths give the same losses; resume repeats them.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/train/test_dpo_train.py

A stage-2 run of the tiny models is the starting point (a native Llava checkpoint, as a user's SFT run is). From it,
the same DPO run (same seed, same batches) is trained with each reference: a frozen copy, the LoRA policy with its
adapters disabled, and log-probs precomputed before training; the per-step losses and reward margins agree to 1e-6.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from llava.run_dir import REF_LOGPS_FILE, RunKind, run_kind
from llava.train.args import parse_args
from llava.train.train import build_dpo_trainer, frozen_reference_copy, train

STEPS = 3


def dpo_argv(sft_checkpoint, dpo_pairs, anyres_data, out, *extra) -> list[str]:
    return ["--model_name_or_path", str(sft_checkpoint), "--version", "vicuna_v1", "--data_path", str(dpo_pairs),
            "--image_folder", str(anyres_data["image_folder"]), "--image_aspect_ratio", "pad",
            "--training_stage", "dpo", "--beta", "0.5", "--gamma", "0.2", "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--max_steps", str(STEPS), "--learning_rate", "2e-2",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True", "--seed", "0",
            "--model_max_length", "512", "--dataloader_num_workers", "0", "--lora_dropout", "0", "--lora_r", "8",
            "--lora_alpha", "16", "--logging_steps", "1", *extra]


def run_losses(argv, *, frozen_copy_for_lora: bool = False, resume=None):
    """Exact per-step losses and the logged reward margins of one DPO run (and its trainer)."""
    model_args, data_args, training_args = parse_args(argv)
    transformers.set_seed(training_args.seed)
    trainer, _ = build_dpo_trainer(model_args, data_args, training_args)
    if frozen_copy_for_lora:  # the LoRA policy's starting model as a frozen copy (its adapters are still zero)
        trainer.ref_model = frozen_reference_copy(trainer.model)
    losses = []
    stock = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = stock(model, inputs, return_outputs, num_items_in_batch)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    return losses, margins, trainer


def test_three_reference_paths_give_the_same_losses(sft_checkpoint, dpo_pairs, anyres_data, tmp_path):
    full_copy = run_losses(dpo_argv(sft_checkpoint, dpo_pairs, anyres_data, tmp_path / "a"))
    full_pre = run_losses(dpo_argv(sft_checkpoint, dpo_pairs, anyres_data, tmp_path / "b",
                                   "--precompute_ref_log_probs", "True"))
    assert full_copy[2].ref_model is not None and full_pre[2].ref_model is None and full_pre[2].ref_table is not None
    assert len(full_copy[0]) == STEPS
    assert full_copy[0][0] == pytest.approx(0.6931472 + 0.2 * full_copy[2].state.log_history[0]["losses/sft"], abs=1e-5)
    assert max(abs(m) for m in full_copy[1][1:]) > 1e-3  # the policy moved away from the reference
    assert full_pre[0] == pytest.approx(full_copy[0], abs=1e-6, rel=0)
    assert full_pre[1] == pytest.approx(full_copy[1], abs=1e-6, rel=0)

    lora = ("--lora_enable", "True", "--freeze_mm_mlp_adapter", "True")  # only the adapters train
    lora_off = run_losses(dpo_argv(sft_checkpoint, dpo_pairs, anyres_data, tmp_path / "c", *lora))
    lora_pre = run_losses(dpo_argv(sft_checkpoint, dpo_pairs, anyres_data, tmp_path / "d", *lora,
                                   "--precompute_ref_log_probs", "True"))
    lora_copy = run_losses(dpo_argv(sft_checkpoint, dpo_pairs, anyres_data, tmp_path / "e", *lora),
                           frozen_copy_for_lora=True)
    assert lora_off[2].ref_model is None and lora_off[2].ref_table is None  # the adapter-disabled base
    assert max(abs(m) for m in lora_off[1][1:]) > 1e-3
    for other in (lora_pre, lora_copy):
        assert other[0] == pytest.approx(lora_off[0], abs=1e-6, rel=0)
        assert other[1] == pytest.approx(lora_off[1], abs=1e-6, rel=0)


def test_lora_with_trained_projector_precomputes_the_reference(sft_checkpoint, dpo_pairs, anyres_data, tmp_path):
    """The projector trains outside the adapters: disabling them would not give the starting model back."""
    losses, _, trainer = run_losses(dpo_argv(sft_checkpoint, dpo_pairs, anyres_data, tmp_path, "--lora_enable", "True",
                                             "--max_steps", "1"))
    assert trainer.ref_table is not None and (tmp_path / REF_LOGPS_FILE).is_file()


def test_dpo_run_saves_native_checkpoint_and_resume_repeats_losses(sft_checkpoint, dpo_pairs, anyres_data, tmp_path):
    out = tmp_path / "run"
    argv = dpo_argv(sft_checkpoint, dpo_pairs, anyres_data, out, "--max_steps", "4", "--save_strategy", "steps",
                    "--save_steps", "2", "--precompute_ref_log_probs", "True")
    full, _, _ = run_losses(argv)
    trainer = train(argv + ["--output_dir", str(tmp_path / "saved")])
    assert run_kind(tmp_path / "saved") == RunKind.FULL
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(
        trainer.state.log_history[0])
    native = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert type(native).__name__ == "LlavaForConditionalGeneration"

    table_mtime = os.path.getmtime(out / REF_LOGPS_FILE)
    resumed, _, trainer = run_losses(argv, resume=out / "checkpoint-2")
    assert os.path.getmtime(out / REF_LOGPS_FILE) == table_mtime  # read back, not recomputed
    torch.testing.assert_close(trainer.ref_table, load_file(out / REF_LOGPS_FILE)["ref_logps"])
    assert resumed == pytest.approx(full[2:], abs=1e-6, rel=0)



def test_accumulation_trains_like_the_larger_batch(sft_checkpoint, dpo_pairs, anyres_data, tmp_path):
    """Batch 1 x 2 accumulation steps = batch 2 (the loss is a mean over pairs; --gamma 0, whose token mean differs)."""
    big = run_losses(dpo_argv(sft_checkpoint, dpo_pairs, anyres_data, tmp_path / "b2", "--gamma", "0"))[2]
    acc = run_losses(dpo_argv(sft_checkpoint, dpo_pairs, anyres_data, tmp_path / "b1", "--gamma", "0",
                              "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2"))[2]
    logged = [[(e["step"], e["loss"], e["rewards/margins"]) for e in t.state.log_history if "loss" in e]
              for t in (big, acc)]
    assert len(logged[0]) == STEPS and logged[0][0][1] == pytest.approx(0.6931472, abs=1e-6)
    for (s1, l1, m1), (s2, l2, m2) in zip(*logged):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5) and m1 == pytest.approx(m2, abs=1e-5)  # fp32 sums
