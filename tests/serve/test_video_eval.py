"""``llava eval`` (and ``--report``) on video records: LlavaOnevision and LlavaNextVideo checkpoints trained here.

The held-out data is the video corpus itself: videos (files and a frame directory), images, an image+video record and
a text record. Each answer is checked against a greedy loop (a full forward per token, no cache, one sample at a time)
over the native ``from_pretrained`` model, fed the prompt and pixels the *training* dataset builds for the record with
the same frame sampling flags. Evaluating with ``--force_sample False`` gives the videos 2, 3 and 4 frames, so one
eval batch holds several frame counts.

    .venv/bin/pytest tests/serve/test_video_eval.py
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from transformers import LlavaNextVideoForConditionalGeneration, LlavaOnevisionForConditionalGeneration

from llava.constants import IGNORE_INDEX
from llava.data.records import parse_record
from llava.data.video import VideoSampling
from llava.serve.eval import batch_inputs, evaluate
from llava.serve.predict import Predictor
from llava.train.train import train
from tests.data.video_clips import write_video_corpus
from tests.train.test_video_train import FRAMES, video_argv

NOT_FORCED = VideoSampling(FRAMES, 1.0, False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_video_corpus(tmp_path_factory.mktemp("video_eval_corpus"))


@pytest.fixture(scope="module")
def onevision(tiny_models, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("video_eval_ov")
    return out, train(video_argv(tiny_models, corpus, out))


@pytest.fixture(scope="module")
def next_video(tiny_models, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("video_eval_nv")
    return out, train(video_argv(tiny_models, corpus, out, newline="no_token", extra=["--max_steps", "2"]))


def expected_frames(record: dict, sampling: VideoSampling) -> list[int]:
    """LLaVA-NeXT's sampling written out for the corpus: clip i has 8 + i frames at 4 fps, the frame directory 8
    frames at its assumed 2 fps."""
    total, fps = (8, 2.0) if record["video"] == "frames_v1" else (8 + int(record["video"][4]), 4.0)
    indices = list(range(0, total, max(1, round(fps / sampling.video_fps))))
    if len(indices) > sampling.frames_upbound or sampling.force_sample:
        indices = np.linspace(0, total - 1, sampling.frames_upbound, dtype=int).tolist()
    return indices


def greedy_answers(trainer, out, native, sampling: VideoSampling, max_new_tokens: int = 8,
                   add_time_instruction: bool = False, prompts: dict | None = None) -> dict[str, str]:
    """Record id -> the native model's greedy answer (no cache, one sample at a time) to the prompt and pixels the
    training dataset builds with ``sampling`` (and ``--add_time_instruction``); ``prompts`` receives the prompt ids."""
    ds = trainer.train_dataset
    saved, ds.video = ds.video, dataclasses.replace(ds.video, sampling=sampling,
                                                    add_time_instruction=add_time_instruction)
    model = native.from_pretrained(out).eval()
    tokenizer = trainer.processing_class.tokenizer
    answers = {}
    try:
        for i in range(len(ds)):
            item = ds[i]
            prompt_len = int((item["labels"] != IGNORE_INDEX).nonzero()[0])  # the answer's first token
            while not tokenizer.decode(item["input_ids"][prompt_len - 1:prompt_len]).strip():
                prompt_len -= 1  # a lone "▁" before an answer ("hi" -> "▁", "hi") is the prompt's space, not its end
            batch = trainer.data_collator([item])
            inputs = {k: v for k, v in batch.items() if k in ("pixel_values", "image_sizes", "batch_num_images",
                                                               "pixel_values_videos")}
            ids = batch["input_ids"][:, :prompt_len]
            if prompts is not None:
                prompts[ds.record(i).id] = ids[0].tolist()
            new = []
            for _ in range(max_new_tokens):
                with torch.no_grad():
                    logits = model(input_ids=ids, **inputs).logits
                token = int(logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            answers[ds.record(i).id] = tokenizer.decode(new, skip_special_tokens=True).strip()
    finally:
        ds.video = saved
    return answers


def test_onevision_eval_of_videos_with_several_frame_counts_and_its_page(onevision, corpus, tmp_path, capsys):
    """``llava eval --force_sample False --add_time_instruction True --report``: every answer equals the native greedy
    answer to the training prompt with those flags; the JSON and the page list each video's sampled frames (LLaVA-NeXT's
    formula), each shown as a thumbnail that decodes."""
    from tests.report.page_checks import eval_report_via_cli, screenshot

    out, trainer = onevision
    training_prompts = {}
    expected = greedy_answers(trainer, out, LlavaOnevisionForConditionalGeneration, NOT_FORCED,
                              add_time_instruction=True, prompts=training_prompts)
    predictor = Predictor.load(out, video_overrides={"force_sample": False, "add_time_instruction": True})
    for raw in corpus["records"]:  # the prompt eval writes (time sentence included) is the training prompt
        record = parse_record(raw)
        prompts, images, _, videos = batch_inputs(predictor, [record], str(corpus["image_folder"]),
                                                  str(corpus["video_folder"]), False)
        assert predictor.prompt_ids(prompts[0], images[0], videos[0]) == training_prompts[record.id], record.id
    report = tmp_path / "report"
    page = eval_report_via_cli(out, corpus["train"], corpus["image_folder"], report, capsys, extra=[
        "--video_folder", str(corpus["video_folder"]), "--force_sample", "False", "--add_time_instruction", "True",
        "--batch_size", "4"])
    saved = json.loads((report / "eval_results.json").read_text())
    real = saved["predictions"]["real images"]
    assert {p["id"]: p["answer"] for p in real} == expected
    by_id = {r["id"]: r for r in corpus["records"]}
    counts = set()
    for p, row in zip(real, page.rows):
        record = by_id[p["id"]]
        if record.get("video"):
            frames = expected_frames(record, NOT_FORCED)
            counts.add(len(frames))
            assert p["video"] == record["video"] and p["frames"] == frames == row["frames"]
            fps = 2.0 if record["video"] == "frames_v1" else 4.0
            assert p["frame_times"] == [round(i / fps, 2) for i in frames]
        else:
            assert "frames" not in p and row["frames"] == []
    assert counts == {2, 3, 4}  # batches of 4 records mixed frame counts
    screenshot(report / "index.html", tmp_path / "eval_page_video.png")


def test_next_video_eval_uses_the_runs_sampling_and_answers_as_native(next_video, corpus):
    out, trainer = next_video
    forced = VideoSampling(FRAMES, 1.0, True)  # the run's flags, read from its llava_args.json
    expected = greedy_answers(trainer, out, LlavaNextVideoForConditionalGeneration, forced)
    predictor = Predictor.load(out)
    assert predictor.video_layout.sampling == forced
    result = evaluate(predictor, str(corpus["train"]), str(corpus["image_folder"]), batch_size=8,
                      video_folder=str(corpus["video_folder"]), show_progress=False)
    assert {p["id"]: p["answer"] for p in result.predictions} == expected
    assert all(p["frames"] == expected_frames(r, forced) for p, r in zip(result.predictions, corpus["records"])
               if r.get("video"))


def test_blank_images_blank_the_video_frames_too(onevision, corpus, monkeypatch):
    """``--blank_images``: the video's pixels reaching ``generate`` are those of white frames (and real ones without)."""
    out, _ = onevision
    predictor = Predictor.load(out)
    seen = []
    original = Predictor.generate

    def spy(self, conversations, images, max_new_tokens=16, videos=None):
        seen.extend(v.pixels for v in videos or [] if v is not None)
        return original(self, conversations, images, max_new_tokens, videos)

    monkeypatch.setattr(Predictor, "generate", spy)
    processor = predictor.processor.image_processor
    white = ((1.0 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std))[None, :, None, None]
    for blank in (True, False):
        seen.clear()
        evaluate(predictor, str(corpus["train"]), str(corpus["image_folder"]), batch_size=4, blank_images=blank,
                 video_folder=str(corpus["video_folder"]), limit=3, show_progress=False)
        assert len(seen) == 3 and all(p.shape == (FRAMES, 3, 64, 64) for p in seen)
        assert all(torch.allclose(p, white.expand_as(p), atol=1e-6) for p in seen) is blank


@pytest.mark.parametrize(("drop", "message"), [
    ("--video_folder", r"record 'v0' has a video \('clip0.mp4'\) but --video_folder is not set"),
    (None, r"missing: video 'clip0.mp4' .*no such file or directory \(record 'v0'\)"),
])
def test_video_errors_name_the_record_and_the_flag(onevision, corpus, tmp_path, capsys, drop, message):
    from llava.cli import main

    out, _ = onevision
    empty = tmp_path / "no_videos"
    empty.mkdir()
    argv = ["eval", "--model", str(out), "--data", str(corpus["train"]), "--image_folder", str(corpus["image_folder"]),
            "--video_folder", str(empty)]
    if drop:
        argv = argv[:argv.index(drop)] + argv[argv.index(drop) + 2:]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    if drop:  # refused before the model loads: the only output
        assert len(err.splitlines()) == 1, err
    lines = [line for line in err.splitlines() if line.startswith("llava eval: error: ")]  # beside loading bars
    assert len(lines) == 1, err
    err = lines[0]
    assert re.search(message, err), err
