"""QLoRA and wandb on video: one OneVision video run with a 4-bit LM + adapters, logged to wandb offline.

    .venv/bin/python -m pytest tests/train/test_video_qlora_wandb.py -q

The run trains on the video corpus (videos, a frame directory, images, image+video, text). wandb's offline log holds
the per-step losses the Trainer logged; ``llava merge`` gives a native LlavaOnevision whose logits on a batch with
videos equal the 4-bit adapter model's as it trained (dequantized base + adapter, fp32, 1e-5).
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from tests.train.test_train_e2e import _read_wandb_run, step_losses, train_with_wandb_offline
from tests.train.test_video_train import _mixed_batch, video_argv, video_corpus  # noqa: F401  (the fixture)


def test_video_qlora_run_logs_to_wandb_and_merges_into_native_onevision(tiny_models, video_corpus, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("wandb")
    from llava.export.merge import merge_lora
    from llava.run_dir import RunKind, run_kind

    run_dir = tmp_path / "qlora"
    argv = video_argv(tiny_models, video_corpus, run_dir, extra=[
        "--lora_enable", "True", "--bits", "4", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "2e-3"])
    trainer = train_with_wandb_offline(argv, tmp_path, monkeypatch)
    assert run_kind(run_dir) is RunKind.QLORA
    # wandb: the steps' losses as the Trainer logged them (its offline log is written after finish() returns)
    logged = step_losses(trainer)
    assert sorted(logged) == [1, 2, 3]
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while True:
        history, _ = _read_wandb_run(log)
        wandb_losses = {h["train/global_step"]: h["train/loss"] for h in history if "train/loss" in h}
        if len(wandb_losses) == len(logged) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert wandb_losses == pytest.approx(logged, abs=1e-6)
    # the 4-bit adapter model on a batch with videos (a file, a frame directory, image+video), an image and text
    batch, records = _mixed_batch(trainer)
    assert batch["pixel_values_videos"].shape[0] == sum(1 for r in records if r.video)
    model = trainer.model.eval()  # LoRA dropout off
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * model.config.text_config.num_hidden_layers  # the LM only, not the tower/projector
    for module in quantized:  # the float32 dequantize path training took (tests/export/test_merge.py)
        module.training = True
    with torch.no_grad():
        expected = model(**batch).logits
        with model.disable_adapter():
            assert (model(**batch).logits - expected).abs().max() > 1e-3  # the adapter matters
    merged_dir = merge_lora(run_dir, tmp_path / "merged")
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"] and "quantization_config" not in config
    merged = LlavaOnevisionForConditionalGeneration.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
