"""--sequence_parallel_size 2 end to end: DeepSpeed on CPU (gloo) with it vs 1 process without it.

Long samples (each > 2,048 tokens: an image and a long multi-turn conversation) train 4 steps in sequence-parallel
groups of 2 ranks and in 1 process with the per-device batch times the number of groups; the per-step losses and the
saved weights agree (fp32, Adam eps 1e-3: <= 1e-5), the ranks of a group saw the same samples and together the
groups saw the 1-process run's, the saved model is the native checkpoint, and a resumed run repeats the losses.
One group (2 processes): Llava padded (ZeRO-3, resume) and packed (ZeRO-2), LlavaNext anyres with LoRA (ZeRO-2,
padded) and full (ZeRO-3, packed), OneVision packed (ZeRO-3) and padded (ZeRO-1). Two data-parallel groups
(4 processes, Llava padded, ZeRO-2) vs 1 process at twice the batch.

    .venv/bin/pytest tests/train/test_sequence_parallel_train.py        # ~1 min per test on 2 idle cores, 4 processes ~2
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import PROBE, REPO, assert_resumes_exactly, deepspeed, probes, step_losses

from llava.data.dataset import LazySupervisedDataset
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


def run_both(tiny_models, anyres_data, data, tmp_path, stage: int, *extra: str, groups: int = 1, **launch):
    """The sequence-parallel run (``groups`` data-parallel groups of 2 ranks, probed) and the 1-process reference with
    ``groups`` x its per-device batch; per-step losses within ATOL, and the samples: the ranks of a group saw the same
    ones, and step k of the reference took group 0's step-k samples, then group 1's. Returns (sp dir, reference)."""
    out = tmp_path / "sp"
    argv = flags(tiny_models, anyres_data, data, out, "--sequence_parallel_size", "2", *extra)
    deepspeed([PROBE], [*zero(stage), *argv], processes=2 * groups, **launch)
    batch = ["--per_device_train_batch_size", str(2 * groups)]  # the last of a repeated flag wins
    seen: list[int] = []
    getitem = LazySupervisedDataset.__getitem__
    LazySupervisedDataset.__getitem__ = lambda self, i: (seen.append(int(i)), getitem(self, i))[1]
    try:
        reference = train([*flags(tiny_models, anyres_data, data, tmp_path / "single", *extra), *batch,
                           "--use_cpu", "True"])
    finally:
        LazySupervisedDataset.__getitem__ = getitem
    assert min(reference.train_dataset.lengths) >= MIN_TOKENS, reference.train_dataset.lengths
    ranks = probes(out, 2 * groups)
    assert [(p["rank"], p["world_size"]) for p in ranks] == [(r, 2 * groups) for r in range(2 * groups)]
    for first, second in zip(ranks[::2], ranks[1::2]):
        assert first["seen"] == second["seen"] and len(first["seen"]) == 4 * 2  # 4 steps x 2 samples
    assert len(seen) == 4 * 2 * groups
    for k in range(4):  # step k: the reference's 2 x groups samples (all different) are the groups' step-k samples
        step = seen[k * 2 * groups:(k + 1) * 2 * groups]
        assert len(set(step)) == len(step) and step == [i for p in ranks[::2] for i in p["seen"][2 * k:2 * k + 2]]
    assert_same_step_losses(out, reference)
    return out, reference


def assert_same_step_losses(out: Path, reference) -> None:
    """The sequence-parallel run's logged losses of steps 1-4 equal the 1-process trainer's within ATOL."""
    losses = step_losses(out)
    expected = {e["step"]: e["loss"] for e in reference.state.log_history if "loss" in e}
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in losses.items():
        assert abs(loss - expected[step]) <= ATOL, (step, loss, expected[step])


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
# anyres samples are 2,299-2,406 tokens here (anyres_max_2: 2,283-2,310): with rows of 4,864 any two share one row
PACKED = ("--packing", "True", "--model_max_length", "4864")


def assert_one_row_per_step(reference) -> None:
    assert 2 * max(reference.train_dataset.lengths) <= reference.args.model_max_length, reference.train_dataset.lengths


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

    out, reference = run_both(tiny_models, anyres_data, long_data, tmp_path, 3, "--image_aspect_ratio", "anyres_max_2",
                              *ANYRES, *PACKED)
    assert_one_row_per_step(reference)
    assert_same_weights(out, tmp_path / "single")
    LlavaOnevisionForConditionalGeneration.from_pretrained(out)


def test_zero3_packed_anyres_matches_one_process(tiny_models, anyres_data, long_data, tmp_path):
    """LlavaNext anyres, full model: each step's two samples (their crops and newline tokens) in one packed row."""
    from transformers import LlavaNextForConditionalGeneration

    out, reference = run_both(tiny_models, anyres_data, long_data, tmp_path, 3, "--image_aspect_ratio", "anyres",
                              *ANYRES, *PACKED)
    assert_one_row_per_step(reference)
    assert_same_weights(out, tmp_path / "single")
    LlavaNextForConditionalGeneration.from_pretrained(out)


def test_zero1_padded_onevision_matches_one_process(tiny_models, anyres_data, long_data, tmp_path):
    """LlavaOnevision (anyres_max_2) padded under ZeRO-1: the checkpoint's optimizer state is stage 1's, each rank's
    half of it."""
    from transformers import LlavaOnevisionForConditionalGeneration

    out, _ = run_both(tiny_models, anyres_data, long_data, tmp_path, 1, "--image_aspect_ratio", "anyres_max_2", *ANYRES)
    assert_same_weights(out, tmp_path / "single")
    shards = [torch.load(out / "checkpoint-2" / "global_step2" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                         map_location="cpu", weights_only=False)["optimizer_state_dict"] for r in (0, 1)]
    assert [int(s["zero_stage"]) for s in shards] == [1, 1] and set(shards[0]["partition_count"]) == {2}
    LlavaOnevisionForConditionalGeneration.from_pretrained(out)


def test_two_data_parallel_groups_match_one_process_with_their_batch(tiny_models, anyres_data, long_data, tmp_path):
    """4 processes at --sequence_parallel_size 2: 2 data-parallel groups, each its own 2 samples a step; 1 process
    with a per-device batch of 4 takes both groups' samples (checked sample by sample in run_both)."""
    out, _ = run_both(tiny_models, anyres_data, long_data, tmp_path, 2, groups=2, timeout=600)
    assert_same_weights(out, tmp_path / "single")
