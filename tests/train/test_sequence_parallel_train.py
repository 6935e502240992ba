"""--sequence_parallel_size 2 end to end: 2 processes (DeepSpeed on CPU, gloo) vs 1 process without it.

Long samples (each > 2,048 tokens: an image and a long multi-turn conversation) train 4 steps in one sequence-parallel
group of 2 ranks and in 1 process with the same per-device batch; the per-step losses and the saved weights agree
(fp32, Adam eps 1e-3: <= 1e-5), both ranks saw the same samples, the saved model is the native checkpoint, and a
resumed run repeats the losses. Llava padded (ZeRO-3, resume) and packed (ZeRO-2), LlavaNext anyres (ZeRO-2), OneVision packed (ZeRO-3),
LoRA (ZeRO-2).

    .venv/bin/pytest tests/train/test_sequence_parallel_train.py        # ~1 min per test on 2 idle cores
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import PROBE, REPO, assert_resumes_exactly, deepspeed, probes, step_losses

from llava.train.train import train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
MIN_TOKENS = 2048
# Adam's step is lr * m / (sqrt(v) + eps): at the default eps 1e-8 a rounding-level gradient difference (the split
# sums attention and the loss in another order) can move an element by up to ~lr, so no fixed weight tolerance has a
# margin that holds on another CPU. eps 1e-3 keeps the same optimizer but bounds d(step)/d(gradient) by lr/eps = 1,
# so the weights differ by rounding only: measured <= 1.2e-7 (an ulp of a norm weight of ~1), losses <= 9.5e-7 (two
# ulps of the loss); both held to 1e-5. The steps still move the weights by ~lr (7.3e-4 over steps 3-4), far past it.
LINEAR_ADAM, ATOL = ["--adam_epsilon", "1e-3"], 1e-5


@pytest.fixture(scope="module")
def long_data(shapes_data, anyres_data, tmp_path_factory) -> Path:
    """8 records, each one anyres image (various sizes) and ~150 turns of shapes questions and answers."""
    qa = json.loads(Path(shapes_data["stage2_qa"]).read_text())
    turns = [t for r in qa for t in r["conversations"]]
    turns = [{**t, "value": t["value"].replace("<image>\n", "").replace("\n<image>", "")} for t in turns]
    images = sorted(anyres_data["sizes"])
    records = []
    for i in range(8):
        convo = turns[i * 30 : i * 30 + 300]
        convo[0] = {**convo[0], "value": "<image>\n" + convo[0]["value"]}
        records.append({"id": f"long{i}", "image": images[(3 * i) % len(images)], "conversations": convo})
    path = tmp_path_factory.mktemp("long") / "long.json"
    path.write_text(json.dumps(records))
    return path


def flags(tiny_models, anyres_data, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(data), "--image_folder", str(anyres_data["image_folder"]),
            "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "2", "--report_to", "none",
            "--model_max_length", "4608", "--seed", "0", *LINEAR_ADAM, *extra]


def zero(stage: int) -> list[str]:
    return ["--deepspeed", str(REPO / "zero_configs" / f"zero{stage}.json")]


def run_both(tiny_models, anyres_data, data, tmp_path, stage: int, *extra: str):
    """The 2-rank sequence-parallel run (probed) and the 1-process reference; returns (sp dir, reference trainer)."""
    out = tmp_path / "sp"
    argv = flags(tiny_models, anyres_data, data, out, "--sequence_parallel_size", "2", *extra)
    deepspeed([PROBE], [*zero(stage), *argv])
    reference = train([*flags(tiny_models, anyres_data, data, tmp_path / "single", *extra), "--use_cpu", "True"])
    assert min(reference.train_dataset.lengths) >= MIN_TOKENS, reference.train_dataset.lengths
    p0, p1 = probes(out)
    assert p0["seen"] == p1["seen"] and len(p0["seen"]) == 8  # one group: both ranks hold the same 4 x 2 samples
    losses = step_losses(out)
    expected = {e["step"]: e["loss"] for e in reference.state.log_history if "loss" in e}
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in losses.items():
        assert abs(loss - expected[step]) <= ATOL, (step, loss, expected[step])
    return out, reference


def assert_same_weights(sp_dir: Path, single_dir: Path, name: str = "model.safetensors") -> None:
    sp, single = load_file(sp_dir / name), load_file(single_dir / name)
    assert set(sp) == set(single)
    moved = 0
    for key, value in single.items():
        torch.testing.assert_close(sp[key], value, rtol=0, atol=ATOL, msg=key)
        moved += 1
    assert moved
    halfway = load_file(single_dir / "checkpoint-2" / name)  # steps 3-4 moved the weights by far more than ATOL
    assert max((value - halfway[key]).abs().max().item() for key, value in single.items()) > 10 * ATOL


def test_zero3_padded_llava_matches_one_process_and_resumes(tiny_models, anyres_data, long_data, tmp_path):
    from transformers import LlavaForConditionalGeneration

    out, reference = run_both(tiny_models, anyres_data, long_data, tmp_path, 3)
    assert_same_weights(out, tmp_path / "single")
    config = json.loads((out / "config.json").read_text())
    assert "llava_sp" not in json.dumps(config)  # the native checkpoint: no attention name of ours
    LlavaForConditionalGeneration.from_pretrained(out)
    argv = [*zero(3), *flags(tiny_models, anyres_data, long_data, out, "--sequence_parallel_size", "2")]
    assert_resumes_exactly(out, lambda: deepspeed([PROBE], [*argv, "--resume_from_checkpoint", "True"]))


def test_zero2_packed_llava_matches_one_process(tiny_models, anyres_data, long_data, tmp_path):
    """Both samples of a step in one packed row (> 4,400 tokens), split over the 2 ranks with their boundary kept."""
    out, _ = run_both(tiny_models, anyres_data, long_data, tmp_path, 2, "--packing", "True")
    assert_same_weights(out, tmp_path / "single")


ANYRES = ("--image_grid_pinpoints", "(1x1),...,(3x3)", "--mm_patch_merge_type", "spatial_unpad")


def test_zero2_anyres_lora_matches_one_process(tiny_models, anyres_data, long_data, tmp_path):
    """LlavaNext (anyres crops of each image's own size) with LoRA: the adapter and the projector / newline. LoRA
    dropout off: its masks are drawn per rank on the slice, so they cannot equal one process's."""
    from llava.run_dir import NON_LORA_FILE

    out, _ = run_both(tiny_models, anyres_data, long_data, tmp_path, 2, "--image_aspect_ratio", "anyres", *ANYRES,
                      "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0")
    assert_same_weights(out, tmp_path / "single", "adapter_model.safetensors")
    assert_same_weights(out, tmp_path / "single", NON_LORA_FILE)


def test_zero3_packed_onevision_matches_one_process(tiny_models, anyres_data, long_data, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    out, _ = run_both(tiny_models, anyres_data, long_data, tmp_path, 3, "--image_aspect_ratio", "anyres_max_2",
                      *ANYRES, "--packing", "True")
    assert_same_weights(out, tmp_path / "single")
    LlavaOnevisionForConditionalGeneration.from_pretrained(out)
