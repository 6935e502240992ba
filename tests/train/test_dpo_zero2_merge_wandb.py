"""DPO LoRA under two-process ZeRO-2, logged to wandb offline, then ``llava merge``: one run, two tests.

    .venv/bin/pytest tests/train/test_dpo_zero2_merge_wandb.py          # slow: one 2-process run (~1 min on 2 cores)

``deepspeed --num_gpus 2 llava/train/train_dpo.py --deepspeed zero_configs/zero2.json --lora_enable True
--report_to wandb`` from the tiny SFT checkpoint (8 pairs, 2 ranks x 2 pairs, 4 steps = 2 epochs; ``--gamma 0``).

- wandb: every logged step carries TRL's preference metrics (``rewards/chosen``, ``rewards/rejected``,
  ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``) and LLaVA-NeXT's ``losses/dpo`` /
  ``losses/sft`` under ``train/``, equal to ``trainer_state.json``'s log history. The values are checked too: step 1's
  policy is the reference (LoRA's B is zero), so its loss is log 2 and its rewards 0; the margin is chosen - rejected;
  the reference log-probs (precomputed: the projector trains outside the adapters) equal a plain native forward of
  the SFT checkpoint per pair; and ``logps/chosen - rewards/chosen / beta`` (the reference's mean log-prob of the
  step's chosen answers), averaged over an epoch's two steps, equals their mean over the 8 pairs (1e-5).
- merge: the merged native ``LlavaForConditionalGeneration`` gives the adapter model's logits (peft, fp32).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import REPO, assert_no_zero_size_tensors, deepspeed

from llava.run_dir import REF_LOGPS_FILE

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BETA = 0.5
STEPS = 4
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected", "losses/dpo", "losses/sft")


def dpo_flags(sft_checkpoint, dpo_pairs, anyres_data, out: Path) -> list[str]:
    return ["--model_name_or_path", str(sft_checkpoint), "--version", "vicuna_v1", "--data_path", str(dpo_pairs),
            "--image_folder", str(anyres_data["image_folder"]), "--image_aspect_ratio", "pad",
            "--dpo_alpha", "1.0", "--beta", str(BETA), "--gamma", "0", "--output_dir", str(out),
            "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
            "--per_device_train_batch_size", "2", "--max_steps", str(STEPS), "--learning_rate", "2e-3",
            "--save_steps", "100", "--logging_steps", "1", "--seed", "0", "--model_max_length", "512"]


@pytest.fixture(scope="module")
def zero2_lora_run(sft_checkpoint, dpo_pairs, anyres_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dpo_zero2")
    out = root / "run"
    argv = ["--deepspeed", str(REPO / "zero_configs" / "zero2.json"),
            *dpo_flags(sft_checkpoint, dpo_pairs, anyres_data, out), "--report_to", "wandb"]
    started = time.monotonic()
    deepspeed([str(REPO / "llava" / "train" / "train_dpo.py")], argv, env={"WANDB_DIR": str(root)}, timeout=900)
    print(f"zero2 DPO LoRA run: {time.monotonic() - started:.1f} s")
    return {"out": out, "wandb_dir": root / "wandb"}


def wandb_history(wandb_dir: Path, steps: int) -> list[dict]:
    from test_train_e2e import _read_wandb_run

    (log,) = wandb_dir.glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while True:  # wandb-core may still be writing the log when the run's processes exit
        history, _ = _read_wandb_run(log)
        rows = [h for h in history if "train/loss" in h]
        if len(rows) == steps or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def native_reference_logps(sft_checkpoint, dpo_pairs, anyres_data, out: Path) -> dict[str, list[float]]:
    """Summed log-prob of each pair's chosen / rejected answer under the SFT checkpoint (native forward, full logits),
    in dataset order."""
    from test_dpo import native_row_logps
    from transformers import LlavaForConditionalGeneration

    from llava.train.args import parse_args
    from llava.train.train import build_dpo_trainer

    # the run's dataset (its rows as training tokenized them), built in this process on CPU
    argv = [*dpo_flags(sft_checkpoint, dpo_pairs, anyres_data, out), "--report_to", "none", "--use_cpu", "True",
            "--training_stage", "dpo"]
    trainer, _ = build_dpo_trainer(*parse_args(argv))
    dataset = trainer.train_dataset
    image_id = trainer.model.config.image_token_index
    native = LlavaForConditionalGeneration.from_pretrained(sft_checkpoint, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        sums = {side: [float(native_row_logps(native, dataset[i], side, image_id)[0]) for i in range(len(dataset))]
                for side in ("chosen", "rejected")}
    assert len(sums["chosen"]) == 8
    return sums


def test_zero2_dpo_lora_logs_trl_metrics_to_wandb(zero2_lora_run, sft_checkpoint, dpo_pairs, anyres_data, tmp_path):
    out = zero2_lora_run["out"]
    run = json.loads((out / "llava_args.json").read_text())
    ta = run["training_args"]
    assert run["run_kind"] == "lora" and ta["training_stage"] == "dpo" and ta["deepspeed"].endswith("zero2.json")
    state = json.loads((out / "trainer_state.json").read_text())
    logged = {e["step"]: e for e in state["log_history"] if "loss" in e}
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, entry in logged.items():
        assert set(PREFERENCE_METRICS) <= set(entry), (step, sorted(entry))
        assert entry["rewards/margins"] == pytest.approx(entry["rewards/chosen"] - entry["rewards/rejected"], abs=1e-6)
        assert entry["loss"] == pytest.approx(entry["losses/dpo"], abs=1e-6)  # --dpo_alpha 1, --gamma 0
    first = logged[1]  # the adapters start at zero: the policy is the reference
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0
    assert first["rewards/accuracies"] == 0  # chosen > rejected is false at a tie
    assert max(abs(logged[s]["rewards/margins"]) for s in (3, 4)) > 1e-3  # the policy moved

    # the reference: the projector trains outside the adapters, so its log-probs were precomputed by the two ranks
    native = native_reference_logps(sft_checkpoint, dpo_pairs, anyres_data, tmp_path / "dataset")
    table = load_file(out / REF_LOGPS_FILE)["ref_logps"]
    assert table.shape == (8, 2)
    table_gap = max((table[:, k] - torch.tensor(native[side])).abs().max().item() for k, side in enumerate(native))
    print(f"precomputed vs native reference log-probs: max gap {table_gap:.2e}")
    assert table_gap <= 1e-5  # measured 9.5e-7 (sums of ~10)
    # and the reference's mean log-probs recovered from the logged metrics per epoch (2 steps x 4 pairs = the 8 pairs)
    for side in ("chosen", "rejected"):
        expected = sum(native[side]) / len(native[side])
        for epoch_steps in ((1, 2), (3, 4)):
            recovered = [logged[s][f"logps/{side}"] - logged[s][f"rewards/{side}"] / BETA for s in epoch_steps]
            gap = abs(sum(recovered) / 2 - expected)
            print(f"reference mean logp/{side}, steps {epoch_steps}: gap {gap:.2e} (|value| {abs(expected):.2f})")
            assert gap <= 1e-5, (side, epoch_steps, recovered, expected)  # measured <= 3.6e-7

    # wandb's offline log: the same values at every logged step, under the Trainer's train/ prefix
    rows = wandb_history(zero2_lora_run["wandb_dir"], STEPS)
    by_step = {row["train/global_step"]: row for row in rows}
    assert sorted(by_step) == sorted(logged)
    for step, entry in logged.items():
        for key in ("loss", *PREFERENCE_METRICS):
            assert by_step[step][f"train/{key}"] == pytest.approx(entry[key], abs=1e-6, rel=0), (step, key)


def test_zero2_dpo_lora_merges_into_native_llava(zero2_lora_run, anyres_data, tmp_path):
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from llava.export.merge import build_adapter_model, merge_lora

    out = zero2_lora_run["out"]
    peft_model, processor, _ = build_adapter_model(out)
    images = [Image.open(anyres_data["image_folder"] / name).convert("RGB") for name in ("img0.png", "wide.png")]
    inputs = processor(text=["<image>\nWhat colour is the box?", "<image>\nWhich colour?"], images=images,
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            adapter_effect = (peft_model(**inputs).logits - expected).abs().max().item()
    assert adapter_effect > 1e-4  # the adapter matters
    merged_dir = merge_lora(out, tmp_path / "merged")
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        got = merged(**inputs).logits
    print(f"merged vs adapter logits: max gap {(got - expected).abs().max().item():.2e} "
          f"(adapter on vs off: {adapter_effect:.2e})")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # measured 3.9e-7
    assert_no_zero_size_tensors(merged_dir)
