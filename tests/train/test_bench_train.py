"""``scripts/bench_train.py`` on the tiny mix: it runs the real training path for a few interleaved steps and its JSON
line has every field with a sane value (not a timing assertion). Also the synthetic mix's shape.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/train/test_bench_train.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_mix(tmp_path_factory):
    from llava.demo.synthetic_mix import generate_mix, write_bench_models

    workdir = tmp_path_factory.mktemp("mix")
    paths = generate_mix(workdir, 120, distinct_images=4)
    write_bench_models(workdir, paths["data_path"], size="tiny")
    return workdir


def test_synthetic_mix_has_the_documented_shape(tmp_path):
    from llava.demo.synthetic_mix import generate_mix

    paths = generate_mix(tmp_path, 1000, distinct_images=2)
    records = [json.loads(line) for line in paths["data_path"].read_text().splitlines()]
    kinds = Counter(r["id"].split("_0")[0] for r in records)
    assert 0.07 < kinds["text_only"] / 1000 < 0.13
    assert all(("image" in r) == (not r["id"].startswith("text_only")) for r in records)
    answer_words = {k: [] for k in kinds}
    for r in records:
        answer_words[r["id"].split("_0")[0]] += [len(t["value"].split()) for t in r["conversations"][1::2]]
    median = {k: sorted(v)[len(v) // 2] for k, v in answer_words.items()}
    assert median["short_vqa"] <= 3 < median["grounding"] < median["conversation"] < median["text_only"]
    turns = sorted(len(r["conversations"]) // 2 for r in records)
    assert turns[len(turns) // 2] <= 3 and turns[-1] >= 10  # most short, a long tail


def test_bench_train_reports_every_field(tiny_mix, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--workdir", str(tiny_mix), "--size", "tiny",
           "--variants", "padded,packed,trl", "--steps", "2", "--block", "1", "--batch_size", "4",
           "--model_max_length", "256", "--workers", "1", "--profile", "packed"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("{"))
    result = json.loads(line)
    assert result["matmul_peak_gflops"] > 0 and result["peak_rss_mib"] > 100
    for name in ("padded", "packed", "trl"):
        v = result["variants"][name]
        assert v["steps"] == 2
        assert v["real_tokens_per_s"] > 0 and v["samples_per_s"] > 0 and v["step_time_median_s"] > 0
        assert 0 <= v["padding_fraction"] < 1 and 0 <= v["data_wait_fraction"] < 1 and 0 < v["mfu"] < 1
        assert v["mean_loss"] > 0 and v["time_to_first_step_s"] > 0 and v["step_peak_mib"] > 0
    # same seed, same sampler: the two variants see the same samples, so the same per-token losses
    assert result["variants"]["packed"]["mean_loss"] == pytest.approx(result["variants"]["padded"]["mean_loss"], abs=1e-3)
    assert result["variants"]["packed"]["padding_fraction"] < result["variants"]["padded"]["padding_fraction"]
    # TRL's SFTTrainer (chat template with generation markers, assistant-only loss) sees the same samples and
    # supervises the same tokens; its loss differs only by image preprocessing (center crop vs resize)
    assert result["variants"]["trl"]["supervised_tokens"] == result["variants"]["padded"]["supervised_tokens"] > 0
    assert result["variants"]["trl"]["padding_fraction"] == result["variants"]["padded"]["padding_fraction"]
    assert result["variants"]["trl"]["mean_loss"] == pytest.approx(result["variants"]["padded"]["mean_loss"], rel=0.02)
    assert set(result["ratios"]) == {"packed/padded", "trl/padded"}
    table = result["profile_ms"]["packed"]
    assert set(table) >= {"data_wait", "vision_tower", "attention", "mlp", "optimizer"}
    assert all(ms >= 0 for ms in table.values()) and table["mlp"] > 0 and table["vision_tower"] > 0
    assert "packed/padded: real tokens/s" in out.stdout


def test_bench_train_video_mix_packed_vs_padded(tiny_mix, tmp_path):
    """``--video_mix``: clips join the mix, both variants train the OneVision video recipe on the same samples."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--workdir", str(tiny_mix), "--size", "tiny",
           "--variants", "padded,packed", "--steps", "3", "--block", "1", "--batch_size", "8", "--video_mix", "60",
           "--video_frames", "4", "--model_max_length", "512", "--workers", "1"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("{")))
    records = [json.loads(line) for line in (tiny_mix / "mix_video60.jsonl").read_text().splitlines()]
    assert sum("video" in r for r in records) == 60 and len(records) == 60 + 120
    padded, packed = result["variants"]["padded"], result["variants"]["packed"]
    assert padded["video_frames"] == packed["video_frames"] > 0 and padded["video_frames"] % 4 == 0
    assert packed["mean_loss"] == pytest.approx(padded["mean_loss"], abs=1e-3)  # the same samples and tokens
    assert packed["padding_fraction"] < padded["padding_fraction"]
    assert result["video_mix"] == 60 and set(result["load_1min"]) == {"start", "end"}
    assert "60 clips in the mix" in out.stdout
