"""Synthetic videos for the demo, the launcher's tiny defaults and the tests: a dot moving left or right, encoded
with PyAV (which ships its own FFmpeg and encodes as well as decodes).

    write_video_corpus("playground/data/dots")   # {"video_folder", "image_folder", "train", "records"}
    write_clip("a.mp4", moving_dot_frames(8, direction=1), fps=4)

The corpus mixes what a OneVision stage-2 run sees: video records (one a directory of frames, sorted by name; the
video marked with ``<image>`` as LLaVA-NeXT writes it, or with ``<video>``), single-image records, a record with an
image and a video, and a text record. Answers are the dot's direction (video) or the image's colour.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def _codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_clip(path: str | Path, frames: list[np.ndarray], fps: int = 10, gop: int = 12, *,
               size: tuple[int, int] | None = None, faststart: bool = False) -> Path:
    """Encode RGB uint8 ``frames`` (all one size, even sides; ``size`` (h, w) when there are none) into ``path``;
    ``faststart``: the index (moov) before the data, so a cut file still opens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2] if frames else size
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(_codec(), rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        stream.time_base = Fraction(1, fps)
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        else:
            stream.bit_rate = 4_000_000
        if not frames:
            container.start_encoding()  # the header (a video stream) without a single frame
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving_dot_frames(n: int, direction: int, size: int = 32, colour=(250, 40, 40)) -> list[np.ndarray]:
    """A dot moving left to right (``direction`` 1) or right to left (-1) over ``n`` frames."""
    out = []
    for t in range(n):
        x = int((t + 0.5) / n * (size - 8)) if direction > 0 else int((n - t - 0.5) / n * (size - 8))
        frame = np.full((size, size, 3), 235, np.uint8)
        frame[size // 2 - 4: size // 2 + 4, x: x + 8] = colour
        out.append(frame)
    return out


def write_video_corpus(root: str | Path, *, n_videos: int = 6, frames: int = 8, fps: int = 4, n_images: int = 3,
                       text: bool = True, mix: bool = True) -> dict:
    """Video records (a dot moving left or right; one a directory of frames), image records, a record with an image and
    a video, and a text record. ``{"video_folder", "image_folder", "train", "records"}``."""
    root = Path(root)
    videos, images = root / "videos", root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_videos):
        direction = 1 if i % 2 == 0 else -1
        answer = "right" if direction > 0 else "left"
        if i == 1:  # a directory of frames, sorted by name
            frame_dir = videos / "frames_v1"
            frame_dir.mkdir(parents=True, exist_ok=True)
            for t, frame in enumerate(moving_dot_frames(frames, direction)):
                Image.fromarray(frame).save(frame_dir / f"{t:04d}.png")
            rel = "frames_v1"
        else:
            rel = f"clip{i}.mp4"
            write_clip(videos / rel, moving_dot_frames(frames + i, direction), fps=fps)
        question = "<image>\nWhich way does the dot move?" if i % 3 else "Which way does the dot move? <video>"
        records.append({"id": f"v{i}", "video": rel, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    for i in range(max(n_images, 1)):
        colour = ("red", "green", "blue")[i % 3]
        rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}[colour]
        Image.new("RGB", (40 + 10 * i, 30), rgb).save(images / f"img{i}.png")
        if i >= n_images:  # img0.png is the image+video record's image
            break
        records.append({"id": f"i{i}", "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": colour}]})
    if mix:
        records.append({"id": "mix", "image": "img0.png", "video": "clip0.mp4", "conversations": [
            {"from": "human", "value": "<image>\n<video>\nSame colour as the dot?"}, {"from": "gpt", "value": "yes"}]})
    if text:
        records.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi."},
                                                        {"from": "gpt", "value": "hi"}]})
    train = root / "train.json"
    train.write_text(json.dumps(records))
    return {"video_folder": videos, "image_folder": images, "train": train, "records": records}
