"""--sequence_parallel_size 2 on video records: 2 processes (DeepSpeed on CPU, gloo) vs 1 process without it.

LlavaOnevision video training (3 frames per video, bilinear pooling, one newline per video) on video, image + video
and text records, 4 steps of 2 records: per-step losses and saved weights of the sequence-parallel group of 2 equal
one process's with the same per-device batch (fp32, Adam eps 1e-3: <= 1e-5, as test_sequence_parallel_train.py
says why), both ranks saw the same records, and each rank's tower encoded its half of every call's frames / crops
(rounded up) where one process encodes all of them. ZeRO-3 with the frozen tower; ZeRO-2 with the tower trained.

    .venv/bin/pytest tests/train/test_sequence_parallel_video.py        # ~1.5 min per test on 2 idle cores
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import REPO, deepspeed, probes
from test_sequence_parallel_train import assert_same_step_losses
from tower_rows_probe import record_tower_rows

from llava.train.train import train
from tests.data.video_clips import write_video_corpus

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
PROBE = str(REPO / "tests" / "train" / "tower_rows_probe.py")
FRAMES, ATOL = 3, 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """8 records: 4 videos, 3 with an image and a video, 1 text (a step with it has one video: 3 frames, odd)."""
    root = tmp_path_factory.mktemp("sp_video")
    corpus = write_video_corpus(root / "corpus", n_videos=4)  # v0..v3 (v1 a frames directory), i0..i2, mix, text
    by_id = {r["id"]: r for r in corpus["records"]}
    mixes = [{**by_id["mix"], "id": f"mix{k}", "video": by_id[v]["video"]} for k, v in enumerate(("v0", "v1", "v2"))]
    records = [by_id[k] for k in ("v0", "v1", "v2", "v3")] + mixes + [by_id["text"]]
    data = root / "sp_video.json"
    data.write_text(json.dumps(records))
    return {**corpus, "train": data}


def flags(tiny_models, corpus, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(corpus["train"]), "--image_folder", str(corpus["image_folder"]),
            "--video_folder", str(corpus["video_folder"]), "--image_aspect_ratio", "anyres_max_2",
            "--image_grid_pinpoints", "(1x1),...,(2x2)", "--mm_patch_merge_type", "spatial_unpad",
            "--mm_newline_position", "one_token", "--frames_upbound", str(FRAMES), "--force_sample", "True",
            "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--adam_epsilon", "1e-3", "--logging_steps", "1", "--save_steps", "2",
            "--report_to", "none", "--model_max_length", "1024", "--seed", "0", *extra]


def run_both(tiny_models, corpus, tmp_path, stage: int, *extra: str) -> tuple[Path, Path]:
    """The 2-rank sequence-parallel run and the 1-process reference: same losses, samples, halved tower rows."""
    out, single = tmp_path / "sp", tmp_path / "single"
    deepspeed([PROBE], ["--deepspeed", str(REPO / "zero_configs" / f"zero{stage}.json"),
                        *flags(tiny_models, corpus, out, "--sequence_parallel_size", "2", *extra)], timeout=900)
    rows: list[int] = []
    undo = record_tower_rows(rows)
    try:
        reference = train([*flags(tiny_models, corpus, single, *extra), "--use_cpu", "True"])
    finally:
        undo()
    p0, p1 = probes(out)
    assert p0["seen"] == p1["seen"] and len(p0["seen"]) == 8  # one group: both ranks hold the same 4 x 2 records
    assert any(n % 2 for n in rows) and len(rows) >= 4, rows  # calls with an odd number of frames / crops
    for rank in (0, 1):  # each rank's tower: its half of every call's rows (rounded up)
        assert json.loads((out / f"tower_rows_rank{rank}.json").read_text()) == [-(-n // 2) for n in rows], rank
    assert_same_step_losses(out, reference)
    return out, single


def assert_same_weights(sp_dir: Path, single_dir: Path, moved: str) -> None:
    """Every saved weight within ATOL; steps 3-4 moved the weights named with ``moved`` by far more than that."""
    sp, single = load_file(sp_dir / "model.safetensors"), load_file(single_dir / "model.safetensors")
    assert set(sp) == set(single)
    for key, value in single.items():
        torch.testing.assert_close(sp[key], value, rtol=0, atol=ATOL, msg=key)
    halfway = load_file(single_dir / "checkpoint-2" / "model.safetensors")
    assert max((single[k] - halfway[k]).abs().max().item() for k in single if moved in k) > 10 * ATOL


def test_zero3_onevision_video_frozen_tower_matches_one_process(tiny_models, corpus, tmp_path):
    out, single = run_both(tiny_models, corpus, tmp_path, 3)
    assert_same_weights(out, single, "multi_modal_projector")


def test_zero2_onevision_video_trained_tower_matches_one_process(tiny_models, corpus, tmp_path):
    out, single = run_both(tiny_models, corpus, tmp_path, 2, "--unfreeze_mm_vision_tower", "True")
    assert_same_weights(out, single, "vision_tower")
