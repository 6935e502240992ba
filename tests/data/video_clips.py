"""Test clips encoded with PyAV: frames of known content, so a test can tell which frames came back.

    write_index_clip(path, frames=60, fps=10)     # frame i is a flat grey of level index_level(i) (h264/mpeg4, GOP 12)
    frame_index(image)                            # the index a decoded frame shows
    write_clip, moving_dot_frames, write_video_corpus                            # from llava/demo/moving_dots.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from llava.demo.moving_dots import moving_dot_frames, write_clip, write_video_corpus  # noqa: F401  (the tests' imports)

LEVEL_STEP = 4  # grey levels between consecutive frames: lossy coding moves a flat frame by far less


def index_level(i: int) -> int:
    return 8 + LEVEL_STEP * i


def frame_index(image: Image.Image) -> int:
    level = float(np.asarray(image.convert("L"), np.float32).mean())
    return int(round((level - 8) / LEVEL_STEP))


def write_index_clip(path: str | Path, frames: int = 60, fps: int = 10, size: tuple[int, int] = (32, 48)) -> Path:
    """Frame ``i`` is a flat grey of level :func:`index_level` ``(i)``: :func:`frame_index` reads it back."""
    h, w = size
    return write_clip(path, [np.full((h, w, 3), index_level(i), np.uint8) for i in range(frames)], fps=fps)


