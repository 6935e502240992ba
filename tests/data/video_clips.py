"""Test clips encoded with PyAV: frames of known content, so a test can tell which frames came back.

    write_index_clip(path, frames=60, fps=10)     # frame i is a flat grey of level index_level(i) (h264/mpeg4, GOP 12)
    frame_index(image)                            # the index a decoded frame shows
    write_video_corpus(root) -> {"video_folder", "image_folder", "train", ...}   # video + image + text records
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

LEVEL_STEP = 4  # grey levels between consecutive frames: lossy coding moves a flat frame by far less


def index_level(i: int) -> int:
    return 8 + LEVEL_STEP * i


def frame_index(image: Image.Image) -> int:
    level = float(np.asarray(image.convert("L"), np.float32).mean())
    return int(round((level - 8) / LEVEL_STEP))


def _codec(container) -> str:  # noqa: ARG001
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_clip(path: str | Path, frames: list[np.ndarray], fps: int = 10, gop: int = 12, *,
               size: tuple[int, int] | None = None, faststart: bool = False) -> Path:
    """Encode RGB uint8 ``frames`` (all one size, even sides; ``size`` (h, w) when there are none) into ``path``;
    ``faststart``: the index (moov) before the data, so a cut file still opens."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2] if frames else size
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(_codec(container), rate=fps)
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


def write_index_clip(path: str | Path, frames: int = 60, fps: int = 10, size: tuple[int, int] = (32, 48)) -> Path:
    """Frame ``i`` is a flat grey of level :func:`index_level` ``(i)``: :func:`frame_index` reads it back."""
    h, w = size
    return write_clip(path, [np.full((h, w, 3), index_level(i), np.uint8) for i in range(frames)], fps=fps)


def moving_dot_frames(n: int, direction: int, size: int = 32, colour=(250, 40, 40)) -> list[np.ndarray]:
    """A dot moving left to right (``direction`` 1) or right to left (-1) over ``n`` frames."""
    out = []
    for t in range(n):
        x = int((t + 0.5) / n * (size - 8)) if direction > 0 else int((n - t - 0.5) / n * (size - 8))
        frame = np.full((size, size, 3), 235, np.uint8)
        frame[size // 2 - 4: size // 2 + 4, x: x + 8] = colour
        out.append(frame)
    return out


def write_video_corpus(root: str | Path, *, n_videos: int = 6, frames: int = 8, fps: int = 4) -> dict:
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
    for i, colour in enumerate(("red", "green", "blue")):
        rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}[colour]
        Image.new("RGB", (40 + 10 * i, 30), rgb).save(images / f"img{i}.png")
        records.append({"id": f"i{i}", "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": colour}]})
    records.append({"id": "mix", "image": "img0.png", "video": "clip0.mp4", "conversations": [
        {"from": "human", "value": "<image>\n<video>\nSame colour as the dot?"}, {"from": "gpt", "value": "yes"}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi."},
                                                    {"from": "gpt", "value": "hi"}]})
    train = root / "train.json"
    train.write_text(json.dumps(records))
    return {"video_folder": videos, "image_folder": images, "train": train, "records": records}
