"""`llava demo --video True` (llava/demo/time_order.py): clips whose answer is the order of their frames.

    .venv/bin/pytest tests/demo/test_video_demo.py

- the generator's answers equal what the decoded pixels say (the dot's centroid per frame, its colour per frame),
  read back with PyAV directly, not through the project's decoder;
- the premise: the frames of a ``left`` clip are those of a ``right`` clip played backwards, so the set of frames
  says nothing about the answer;
- a reduced end-to-end run prints the table and the video model beats the single-frame model and chance.
"""

from __future__ import annotations

import json
import random

import av
import numpy as np
import pytest

from llava.demo.time_order import (
    COLOURS,
    FRAMES,
    SIZE,
    VideoDemoConfig,
    clip_frames,
    generate_time_order_dataset,
    run_video_demo,
)


def _decoded(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24").astype(int) for frame in container.decode(video=0)]


def _dot_mask(frame: np.ndarray) -> np.ndarray:
    """Pixels far from the light grey background (the codec blurs the dot's edge by a few levels)."""
    return np.abs(frame - 235).max(axis=2) > 60


def _answer_from_pixels(kind: str, frames: list[np.ndarray]) -> str:
    if kind == "direction":
        xs = [np.nonzero(_dot_mask(f))[1].mean() for f in frames]
        slope = np.polyfit(np.arange(len(xs)), xs, 1)[0]
        assert abs(slope) > 2, xs  # it does move
        return "right" if slope > 0 else "left"
    first = frames[0][_dot_mask(frames[0])].mean(axis=0)
    nearest = min(("red", "blue"), key=lambda c: np.abs(first - np.array(COLOURS[c])).sum())
    return nearest


def test_answers_match_the_decoded_pixels(tmp_path):
    data = generate_time_order_dataset(tmp_path, n_train=8, n_heldout=8, seed=3)
    for split in ("train", "heldout"):
        records = json.loads(data[split].read_text())
        assert sorted(r["conversations"][1]["value"] for r in records).count("left") == len(records) // 4
        for rec in records:
            frames = _decoded(data["video_folder"] / rec["video"])
            assert len(frames) == FRAMES and frames[0].shape == (SIZE, SIZE, 3)
            assert _answer_from_pixels(rec["question_type"], frames) == rec["conversations"][1]["value"], rec
    for rec in json.loads(data["train_single"].read_text()):  # a still clip: one frame repeated
        frames = _decoded(data["video_folder"] / rec["video"])
        centres = [np.argwhere(_dot_mask(f)).mean(axis=0) for f in frames]
        assert len(frames) == FRAMES and all(np.abs(c - centres[0]).max() <= 0.5 for c in centres), centres


def test_backward_clips_are_forward_clips_reversed():
    """The same random stream gives the same frames in reverse order: no single frame tells the answer."""
    for kind in ("direction", "order"):
        forward = clip_frames(kind, False, random.Random(7))
        backward = clip_frames(kind, True, random.Random(7))
        assert all((a == b).all() for a, b in zip(forward, backward[::-1]))
        assert not all((a == b).all() for a, b in zip(forward, backward))


@pytest.mark.slow
def test_video_model_beats_single_frame_model(tmp_path, capsys):
    cfg = VideoDemoConfig(n_train=256, n_heldout=64, epochs=3, batch_size=8)  # 96 steps per model
    summary = run_video_demo(tmp_path, cfg)
    out = capsys.readouterr().out
    assert "video model, frames in order" in out and "single-frame model, one frame" in out and "CPU s" in out
    acc = {name: row["overall"] for name, row in summary["accuracy"].items()}
    assert acc["video model, frames in order"] >= 0.75, acc
    assert acc["video model, frames in order"] - acc["single-frame model, one frame"] >= 0.2, acc
    for order_blind in ("video model, frames shuffled", "video model, blank frames", "single-frame model, one frame"):
        assert abs(acc[order_blind] - 0.5) <= 0.2, acc  # chance, 64 held-out clips
    assert acc["video model, frames reversed"] <= 0.25, acc  # it reads the order: reversed, it answers the opposite
    assert json.loads((tmp_path / "video_demo_results.json").read_text())["accuracy"] == summary["accuracy"]
