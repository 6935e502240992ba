"""DPO on two processes (gloo): ZeRO-3 through LLaVA-NeXT's entry path equals one process with the doubled batch.

    .venv/bin/pytest tests/train/test_dpo_distributed.py          # ~3 min on 2 cores

``deepspeed --num_gpus 2 llava/train/train_dpo.py --deepspeed zero_configs/zero3.json ...`` (the path LLaVA-NeXT's
``dpo_ov7b.sh`` launches; the frozen reference copy sharded by ZeRO-3 as the policy is, or reference log-probs
precomputed in step by both ranks) gives the per-step
losses of one plain process with batch 2 x 2 (fp32, <= 1e-5; ``--gamma 0`` as in ``dpo_ov7b.sh``, so the loss is a
mean over pairs on every rank), and a resume from the middle checkpoint repeats the later losses (<= 1e-6).
"""

from __future__ import annotations

import pytest
from test_distributed import REPO, assert_resumes_exactly, deepspeed, step_losses

from llava.train.train import train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def flags(sft_checkpoint, dpo_pairs, anyres_data, out, batch: int) -> list[str]:
    return ["--model_name_or_path", str(sft_checkpoint), "--version", "vicuna_v1", "--data_path", str(dpo_pairs),
            "--image_folder", str(anyres_data["image_folder"]), "--image_aspect_ratio", "pad",
            "--dpo_alpha", "1.0", "--beta", "0.5", "--gamma", "0", "--output_dir", str(out),
            "--per_device_train_batch_size", str(batch), "--max_steps", "4", "--learning_rate", "2e-3",
            "--save_steps", "2", "--logging_steps", "1", "--report_to", "none", "--seed", "0",
            "--model_max_length", "512"]


@pytest.mark.parametrize("reference", ["frozen_copy", "precomputed"])
def test_zero3_dpo_equals_one_process_and_resumes(sft_checkpoint, dpo_pairs, anyres_data, tmp_path, reference):
    out = tmp_path / "zero3"
    extra = ["--precompute_ref_log_probs", "True"] if reference == "precomputed" else []
    entry = [str(REPO / "llava" / "train" / "train_dpo.py")]
    argv = ["--deepspeed", str(REPO / "zero_configs" / "zero3.json"),
            *flags(sft_checkpoint, dpo_pairs, anyres_data, out, 2), *extra]
    deepspeed(entry, argv, timeout=900)
    single = train([*flags(sft_checkpoint, dpo_pairs, anyres_data, tmp_path / "single", 4), *extra,
                    "--training_stage", "dpo", "--use_cpu", "True", "--save_strategy", "no"])
    expected = {e["step"]: e["loss"] for e in single.state.log_history if "loss" in e}
    got = step_losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    assert len({round(v, 4) for v in got.values()}) > 1  # the policy moved
    for step, loss in got.items():
        assert abs(loss - expected[step]) <= 1e-5, (step, loss, expected[step])
    assert_resumes_exactly(out, lambda: deepspeed(entry, [*argv, "--resume_from_checkpoint", "True"], timeout=900))
