"""Bad videos: ``llava data check`` names each with its record id; ``--on_bad_sample skip`` trains past them, counted.

    .venv/bin/python -m pytest tests/data/test_video_check.py -q

The corpus: good clips, a clip cut short with its index first (opens, then its frames end), a clip cut short with its
index last (does not open), a container without frames, a text file named .mp4, a missing file, a path escaping
--video_folder, an 8K clip, a video too long for --model_max_length, and a video record in a run without
--video_folder (the last one through the index only).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llava.cli import main
from llava.train.train import train
from tests.data.video_clips import moving_dot_frames, write_clip

EXPECTED = {"video_truncated": ["cut_late"], "video_unreadable": ["cut_early", "text"], "video_empty": ["no_frames"],
            "video_missing": ["missing"], "video_outside_folder": ["escape"], "video_too_large": ["8k"],
            "video_tokens_exceed_max_length": ["long"]}


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_videos")
    videos = root / "videos"
    for i in range(4):
        write_clip(videos / f"good{i}.mp4", moving_dot_frames(8, 1 if i % 2 else -1), fps=4)
    whole = write_clip(videos / "whole.mp4", moving_dot_frames(40, 1), fps=4, faststart=True).read_bytes()
    (videos / "cut_late.mp4").write_bytes(whole[: len(whole) // 4])  # index first: opens, frames end early
    tail = write_clip(videos / "tail.mp4", moving_dot_frames(40, 1), fps=4).read_bytes()
    (videos / "cut_early.mp4").write_bytes(tail[: len(tail) // 2])  # index last: cut off
    write_clip(videos / "no_frames.mp4", [], fps=4, size=(32, 32))
    (videos / "text.mp4").write_text("not a video")
    write_clip(videos / "8k.mp4", [np.zeros((4320, 7680, 3), np.uint8)], fps=1)
    write_clip(videos / "long.mp4", moving_dot_frames(120, 1), fps=4)  # 30 s at --video_fps 1: 30 frames
    (root / "outside.mp4").write_bytes((videos / "good0.mp4").read_bytes())

    def rec(rid, video):
        return {"id": rid, "video": video, "conversations": [{"from": "human", "value": "<image>\nWhich way?"},
                                                            {"from": "gpt", "value": "left"}]}

    records = [rec(f"good{i}", f"good{i}.mp4") for i in range(4)]
    records += [rec("cut_late", "cut_late.mp4"), rec("cut_early", "cut_early.mp4"), rec("no_frames", "no_frames.mp4"),
                rec("text", "text.mp4"), rec("missing", "nope.mp4"), rec("escape", "../outside.mp4"),
                rec("8k", "8k.mp4"), rec("long", "long.mp4")]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"data_path": data, "video_folder": videos, "root": root}


def video_flags(tiny_models, corpus) -> list[str]:
    # OneVision video, 1 frame per second (no cap): good clips give 2 frames (2*4+1 = 9 tokens), long.mp4 30 (121)
    return ["--data_path", str(corpus["data_path"]), "--video_folder", str(corpus["video_folder"]),
            "--image_folder", str(corpus["root"]), "--model_name_or_path", str(tiny_models["llm"]),
            "--vision_tower", str(tiny_models["vision_tower"]), "--version", "vicuna_v1", "--model_max_length", "96",
            "--image_aspect_ratio", "anyres_max_2", "--mm_patch_merge_type", "spatial_unpad",
            "--mm_newline_position", "one_token", "--video_fps", "1"]


def test_data_check_names_every_bad_video_with_its_record_id(tiny_models, bad_videos, capsys):
    code = main(["data", "check", *video_flags(tiny_models, bad_videos), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False
    got = {kind: info["record_ids"] for kind, info in report["problems"].items()}
    assert got == EXPECTED
    assert all(info["severity"] == "error" for info in report["problems"].values())
    video = report["stats"]["video"]  # every readable video: the four good clips (8 frames, 2 s) and long.mp4
    assert (video["frames"]["min"], video["frames"]["p50"], video["frames"]["max"]) == (8, 8, 120)
    assert (video["sampled_frames"]["min"], video["sampled_frames"]["max"]) == (2, 30)
    assert (video["tokens"]["min"], video["tokens"]["max"]) == (9, 121)
    assert (video["duration_s"]["min"], video["duration_s"]["max"]) == (2, 30)
    assert report["stats"]["modality"] == {"image": 0, "video": 4, "text_only": 0}


def test_skip_trains_past_bad_videos_and_counts_them(tiny_models, bad_videos, tmp_path):
    out = tmp_path / "run"
    trainer = train([*video_flags(tiny_models, bad_videos), "--on_bad_sample", "skip", "--output_dir", str(out),
                     "--per_device_train_batch_size", "1", "--max_steps", "6", "--learning_rate", "1e-3",
                     "--logging_steps", "1", "--save_steps", "1000", "--report_to", "none", "--use_cpu", "True",
                     "--seed", "0"])
    assert trainer.state.global_step == 6
    report = json.loads((out / "bad_samples.json").read_text())
    # the index reads container metadata only: what that shows is dropped before step 1
    assert report["invalid_records"]["counts"] == {"video_unreadable": 2, "video_empty": 1, "video_missing": 1,
                                                   "video_outside_folder": 1, "video_too_large": 1}
    assert report["cannot_train"]["counts"] == {"video_tokens_exceed_max_length": 1}
    # cut_late opens and lists its frames; its decode fails when drawn, and the sample is replaced and counted
    assert report["failed_during_training"]["counts"] == {"video_truncated": 1}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and all(np.isfinite(losses))


def test_video_records_without_video_folder_stop_the_run_naming_them(tiny_models, bad_videos, tmp_path):
    from llava.data.validate import DataError

    flags = video_flags(tiny_models, bad_videos)
    cut = flags.index("--video_folder")
    with pytest.raises(DataError, match=r"(?s)video_not_enabled.*good0") as info:
        train([*flags[:cut], *flags[cut + 2:], "--output_dir", str(tmp_path), "--max_steps", "1", "--report_to",
               "none", "--use_cpu", "True"])
    assert "--video_folder is not set" in str(info.value)
