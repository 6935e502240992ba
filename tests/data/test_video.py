"""Video records and decoding: LLaVA-NeXT's frame sampling, seeking to the sampled frames, frame directories,
confinement to --video_folder, bad videos, the time instruction.

    .venv/bin/python -m pytest tests/data/test_video.py -q

Clips are encoded here with PyAV; frame ``i`` shows a grey level that names it, so a test reads back which frames
the decoder returned. The sampling reference is LLaVA-NeXT's ``process_video_with_decord`` written out below.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from llava.data.records import RecordError, parse_record
from llava.data.video import (
    VideoInfo,
    VideoLayout,
    VideoLoadError,
    VideoSampling,
    decode_video_frames,
    probe_video,
    sample_frame_indices,
    time_instruction,
    video_messages,
)
from tests.data.video_clips import frame_index, index_level, write_clip, write_index_clip


def llava_next_indices(total: int, fps: float, video_fps: float, upbound: int, force: bool) -> list[int]:
    """LLaVA-NeXT ``process_video_with_decord`` (its utils.py)'s frame choice, as written there."""
    avg_fps = round(fps / video_fps)
    frame_idx = [i for i in range(0, total, avg_fps)]
    if upbound > 0:
        if len(frame_idx) > upbound or force:
            frame_idx = np.linspace(0, total - 1, upbound, dtype=int).tolist()
    return frame_idx


@pytest.mark.parametrize("total", [1, 7, 30, 31, 300, 1801])
@pytest.mark.parametrize("fps", [10.0, 24.0, 29.97, 30.0])
def test_sampling_is_llava_next(total, fps):
    for video_fps in (1, 2, 5):
        for upbound in (0, 1, 8, 32, 64):
            for force in (False, True):
                if force and not upbound:
                    continue
                expected = llava_next_indices(total, fps, video_fps, upbound, force)
                assert sample_frame_indices(total, fps, VideoSampling(upbound, video_fps, force)) == expected


def test_time_instruction_is_llava_next_text():
    info = VideoInfo(frames=95, fps=10.0, height=32, width=32)
    indices = sample_frame_indices(95, 10.0, VideoSampling(4, 1, True))
    assert indices == [0, 31, 62, 94]
    expected = ("The video lasts for 9.50 seconds, and 4 frames are uniformly sampled from it. These frames are located "
                "at 0.00s,3.10s,6.20s,9.40s.Please answer the following questions related to this video.")
    assert time_instruction(info, indices, VideoSampling(4, 1, True)) == expected
    record = parse_record({"id": "a", "video": "x.mp4", "conversations": [
        {"from": "human", "value": "What happens? <image>"}, {"from": "gpt", "value": "x"}]})
    layout = VideoLayout(64, 4, add_time_instruction=True)
    first = video_messages(record.messages, info, indices, layout)[0].content
    assert first == f"<video>\n{expected}\nWhat happens? "  # LLaVA-NeXT: token, sentence, the turn without its token


def llava_next_time_instruction(total: int, fps: float, video_fps: float, upbound: int, force: bool) -> str:
    """LLaVA-NeXT's ``process_video_with_decord`` frame times and train.py's sentence, as written there: in the
    uncapped case a frame's time is its index over the sampling step ``avg_fps``, in the capped one over the fps."""
    video_time = total / fps
    avg_fps = round(fps / video_fps)
    frame_idx = [i for i in range(0, total, avg_fps)]
    frame_time = [i / avg_fps for i in frame_idx]
    if upbound > 0:
        if len(frame_idx) > upbound or force:
            frame_idx = np.linspace(0, total - 1, upbound, dtype=int).tolist()
            frame_time = [i / fps for i in frame_idx]
    frame_time = ",".join([f"{i:.2f}s" for i in frame_time])
    num_frames_to_sample = len(frame_idx)
    return (f"The video lasts for {video_time:.2f} seconds, and {num_frames_to_sample} frames are uniformly sampled "
            f"from it. These frames are located at {frame_time}.Please answer the following questions related to "
            f"this video.")


@pytest.mark.parametrize("fps", [10.0, 24.0, 25.0, 29.97, 30.0])
def test_frame_times_are_llava_next(fps):
    """Every case where LLaVA-NeXT samples (``round(fps / video_fps)`` > 0; 0 raises there): index / step
    uncapped (e.g. 29.97 fps at --video_fps 2: frame 15 is at 1.00s), index / fps capped or forced."""
    differs = 0
    for total in (1, 7, 30, 31, 300, 1801):
        for video_fps in (0.5, 1, 2, 5):
            for upbound in (0, 1, 8, 32, 64):
                for force in (False, True):
                    if force and not upbound:
                        continue
                    sampling = VideoSampling(upbound, video_fps, force)
                    info = VideoInfo(frames=total, fps=fps, height=32, width=32)
                    indices = sample_frame_indices(total, fps, sampling)
                    expected = llava_next_time_instruction(total, fps, video_fps, upbound, force)
                    assert time_instruction(info, indices, sampling) == expected, (total, video_fps, upbound, force)
                    differs += ",".join(f"{i / fps:.2f}s" for i in indices) not in expected
    assert differs > 0  # index / fps everywhere (the old formula) fails this test


def test_frame_directory_times_are_llava_next():
    """LLaVA-NeXT's frame-directory path: ``avg_fps = 2``, each sampled frame at index / 2, the video total / 2."""
    info = VideoInfo(frames=9, fps=2.0, height=32, width=32, frame_dir=True)
    for sampling in (VideoSampling(4, 1, True), VideoSampling(0, 2, False), VideoSampling(0, 1, False)):
        indices = sample_frame_indices(9, 2.0, sampling)
        times = ",".join(f"{i / 2:.2f}s" for i in indices)
        assert f"lasts for 4.50 seconds, and {len(indices)} frames" in time_instruction(info, indices, sampling)
        assert f"located at {times}.Please" in time_instruction(info, indices, sampling)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    write_index_clip(folder / "count.mp4", frames=60, fps=10)
    return folder


def test_probe_reads_metadata(clip):
    info = probe_video(clip, "count.mp4")
    assert (info.frames, info.fps, info.height, info.width) == (60, 10.0, 32, 48)
    assert info.duration == pytest.approx(6.0)


@pytest.mark.parametrize("indices", [[0, 19, 39, 59], [5, 6, 7], [59], [0, 0, 1, 1], [3, 50, 12], list(range(60))])
def test_decode_returns_exactly_the_sampled_frames(clip, indices):
    frames = decode_video_frames(clip, "count.mp4", indices, size=16)
    assert [frame_index(f) for f in frames] == indices
    assert all(f.size == (16, 16) and f.mode == "RGB" for f in frames)


def test_decode_by_llava_next_sampling(clip):
    info = probe_video(clip, "count.mp4")
    for sampling in (VideoSampling(8, 1, True), VideoSampling(0, 2, False), VideoSampling(3, 1, False)):
        indices = sample_frame_indices(info.frames, info.fps, sampling)
        assert [frame_index(f) for f in decode_video_frames(clip, "count.mp4", indices, info=info)] == indices


def test_frame_directory_sorted_by_name(tmp_path):
    frames = tmp_path / "videos" / "shot"
    frames.mkdir(parents=True)
    order = [3, 0, 2, 1]  # written out of order; names sort 0000 < 0001 < ...
    for i in order:
        Image.new("RGB", (20, 10), (index_level(i),) * 3).save(frames / f"{i:04d}.png")
    (frames / "notes.txt").write_text("not a frame")
    info = probe_video(tmp_path / "videos", "shot")
    assert (info.frames, info.fps, info.frame_dir) == (4, 2.0, True)
    got = decode_video_frames(tmp_path / "videos", "shot", [0, 1, 2, 3], size=8)
    assert [frame_index(f) for f in got] == [0, 1, 2, 3]


def test_confinement_and_bad_videos(tmp_path, clip):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "text.mp4").write_text("this is not a video")
    good = (clip / "count.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (folder / "empty_dir").mkdir()
    os.symlink(clip / "count.mp4", folder / "link_out.mp4")
    write_clip(folder / "huge.mp4", [np.zeros((4320, 7680, 3), np.uint8)], fps=1)
    cases = {"../x.mp4": "outside_folder", "/abs/x.mp4": "absolute_path", "nope.mp4": "missing",
             "text.mp4": "unreadable", "truncated.mp4": "unreadable", "empty_dir": "empty",
             "link_out.mp4": "outside_folder", "huge.mp4": "too_large"}
    for rel, kind in cases.items():
        with pytest.raises(VideoLoadError) as info:
            probe_video(folder, rel)
        assert info.value.kind == kind, (rel, str(info.value))
        assert rel in str(info.value) and str(folder) in str(info.value)


def test_records_mark_the_video_with_image_or_video():
    conv = [{"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "A dog runs."}]
    record = parse_record({"id": "v1", "video": "clip.mp4", "conversations": conv})
    assert record.video == "clip.mp4" and record.images == []
    assert record.messages[0].content == "<video>\nWhat happens?" and "video" not in record.extras
    same = parse_record({"id": "v2", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, conv[1]]})
    assert same.messages == record.messages
    mixed = parse_record({"id": "m", "image": "a.png", "video": "c.mp4", "conversations": [
        {"from": "human", "value": "<image> and <video>: same?"}, conv[1]]})
    assert mixed.images == ["a.png"] and mixed.num_image_placeholders == 1
    bad = [({"id": "b1", "image": "a.png", "video": "c.mp4", "conversations": [
                {"from": "human", "value": "<image> <image> same?"}, conv[1]]}, "video_token_mismatch"),
           ({"id": "b2", "video": "c.mp4", "conversations": [
               {"from": "human", "value": "<video> <video>"}, conv[1]]}, "video_token_mismatch"),
           ({"id": "b3", "conversations": [{"from": "human", "value": "<video> hi"}, conv[1]]}, "video_token_mismatch"),
           ({"id": "b4", "video": ["a.mp4"], "conversations": conv}, "bad_type")]
    for raw, kind in bad:
        with pytest.raises(RecordError) as info:
            parse_record(raw)
        assert info.value.kind == kind and info.value.record_id == raw["id"]


def test_frame_pixels_equal_the_tower_image_processor(clip):
    """``frames_to_pixel_values`` (rescale + normalise of the tower-sized frames) against transformers' own CLIP image
    processor on the same frames (resize and crop are no-ops at the tower's size)."""
    import torch
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from llava.data.video import frames_to_pixel_values

    frames = decode_video_frames(clip, "count.mp4", [0, 30, 59], size=32)
    frames = [Image.fromarray(np.asarray(f) // 3 + np.arange(32, dtype=np.uint8)[None, :, None]) for f in frames]
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = processor(images=frames, return_tensors="pt")["pixel_values"]
    got = frames_to_pixel_values(frames, processor)
    assert got.shape == (3, 3, 32, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
