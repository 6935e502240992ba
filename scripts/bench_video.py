"""Video decoding cost in a DataLoader worker: ms per sample and the worker's RSS growth, for N frames sampled from a
long high-resolution clip (LLaVA-NeXT's --force_sample over the whole video, each frame resized to the tower's input).

    .venv/bin/python scripts/bench_video.py                         # 3 min of 1080p at 25 fps, 32 frames, 8 samples
    .venv/bin/python scripts/bench_video.py --minutes 1 --frames 64 --size 384 --clip /tmp/long.mp4

The clip is encoded once with PyAV (libx264, a moving pattern, keyframe every 2 s) and kept at ``--clip``. Each
sample opens the file, reads its metadata, samples ``--frames`` indices and decodes only those
(``llava.data.video.decode_video_frames``: seek, decode forward to the frame, resize at once), inside a DataLoader
worker process, which reports its own VmRSS before the first sample and after each one.
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llava.data.video import VideoSampling, decode_video_frames, probe_video, sample_frame_indices


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_long_clip(path: Path, minutes: float, height: int, width: int, fps: int) -> Path:
    import av
    from tqdm.auto import tqdm

    n = int(minutes * 60 * fps)
    luma = np.broadcast_to(np.linspace(16, 235, width, dtype=np.uint8)[None, :], (height, width))
    chroma = np.full((height // 2, width), 128, np.uint8)  # yuv420p: U and V planes, quarter size each
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt, stream.gop_size = width, height, "yuv420p", 2 * fps
        stream.time_base = Fraction(1, fps)
        if stream.codec_context.name == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "28"}
        for t in tqdm(range(n), desc=f"encoding {minutes} min of {width}x{height}", unit="frame"):
            y = luma.copy()
            x = (t * 7) % (width - 200)
            y[height // 3: height // 3 + 200, x: x + 200] = 235
            frame = np.concatenate([y, chroma])  # encoded as yuv420p directly (no RGB conversion per frame)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


class DecodeSamples(Dataset):
    def __init__(self, clip: Path, n: int, frames: int, size: int):
        self.clip, self.n, self.frames, self.size = clip, n, frames, size

    def __len__(self) -> int:
        return self.n + 1

    def __getitem__(self, i: int) -> dict:
        if i == 0:  # the worker's baseline: imports done, nothing decoded yet
            return {"ms": 0.0, "rss": rss_mib()}
        start = time.perf_counter()
        info = probe_video(self.clip.parent, self.clip.name)
        indices = sample_frame_indices(info.frames, info.fps, VideoSampling(self.frames, 1, True))
        frames = decode_video_frames(self.clip.parent, self.clip.name, indices, size=self.size, info=info)
        pixels = torch.from_numpy(np.stack([np.asarray(f) for f in frames]))
        return {"ms": (time.perf_counter() - start) * 1000, "rss": rss_mib(), "shape": list(pixels.shape)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default="/tmp/llava_bench_long_1080p.mp4")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=384, help="the tower's input side (frames resized to it)")
    p.add_argument("--samples", type=int, default=8)
    args = p.parse_args()
    clip = Path(args.clip)
    if not clip.is_file():
        write_long_clip(clip, args.minutes, args.height, args.width, args.fps)
    info = probe_video(clip.parent, clip.name)
    loader = DataLoader(DecodeSamples(clip, args.samples, args.frames, args.size), batch_size=None, num_workers=1)
    rows = list(loader)
    baseline = rows[0]["rss"]
    samples = rows[1:]
    result = {"clip": f"{info.width}x{info.height}, {info.frames} frames at {info.fps:g} fps ({info.duration:.0f} s), "
                      f"{clip.stat().st_size / 2**20:.0f} MiB",
              "frames_per_sample": args.frames, "frame_size": args.size,
              "ms_per_sample": {"first": round(samples[0]["ms"]), "median": round(float(np.median([s["ms"] for s in samples])))},
              "worker_rss_mib": {"before": round(baseline), "max": round(max(s["rss"] for s in samples))},
              "worker_rss_growth_mib": round(max(s["rss"] for s in samples) - baseline),
              "pixels": samples[0]["shape"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
