"""Video records: LLaVA-NeXT's frame sampling, decoding only the sampled frames (PyAV), token counts per video.

    sampling = VideoSampling(frames_upbound=32, video_fps=1, force_sample=True)
    info = probe_video(video_folder, "clips/a.mp4")           # frames, fps, duration, size: container metadata only
    indices = sample_frame_indices(info.frames, info.fps, sampling)
    frames = decode_video_frames(video_folder, "clips/a.mp4", indices, size=384)   # PIL images, size x size
    layout.video_tokens(len(indices))                          # what the native model's forward yields

A video is a file PyAV opens (mp4, mkv, webm, avi, ...) or a directory of frame images, sorted by name (LLaVA-NeXT's
``shareVideoGPTV`` frames; it assumes 2 frames per second for them, and so does :data:`FRAME_DIR_FPS`). Its path is
relative to ``--video_folder`` and may not leave it (``..``, symlinks, absolute paths are refused).

Sampling keeps LLaVA-NeXT's meaning (``process_video_with_decord`` in its
``utils.py``): every
``round(fps / video_fps)``-th frame; when that gives more than ``frames_upbound`` frames, or with ``force_sample``,
``frames_upbound`` frames evenly spaced, ``np.linspace(0, total - 1, frames_upbound, dtype=int)``. Frame times are
``index / fps`` seconds (LLaVA-NeXT divides by the sampling step instead in the uncapped case; its times are wrong
there, ours are the frames' own). ``--add_time_instruction`` inserts LLaVA-NeXT's sentence, word for word
(:func:`time_instruction`).

Decoding seeks to each sampled frame (a keyframe before it, then decodes forward) and converts only the sampled
frames, each resized to the tower's square input as soon as it is decoded: memory stays at a few frames whatever the
video's length and resolution. Every failure is a :class:`VideoLoadError` whose ``kind`` is one of
:data:`VIDEO_ERROR_KINDS`, naming the path and the folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from llava.constants import DEFAULT_VIDEO_TOKEN
from llava.data.images import ImageLoadError
from llava.data.records import Message

if TYPE_CHECKING:
    import torch

VIDEO_ERROR_KINDS = (
    "missing",  # no such file or directory (or --video_folder does not exist)
    "absolute_path",  # an absolute path; paths are relative to --video_folder
    "outside_folder",  # the path leaves --video_folder through '..' or a symlink
    "invalid_path",  # empty or a NUL byte
    "unreadable",  # not a video PyAV can open (or a truncated container), or the OS refused to read it
    "truncated",  # the container opens, but decoding breaks off or ends well before its frame count
    "empty",  # a container without a video stream or without frames, or a directory without frame images
    "zero_length",  # a video stream whose duration is zero
    "too_large",  # frames of more than MAX_FRAME_PIXELS pixels
)
FRAME_DIR_FPS = 2.0  # LLaVA-NeXT's assumption for a directory of frames (shareVideoGPTV: avg_fps = 2)
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_FRAME_PIXELS = 4096 * 4096  # 4K fits; 8K (7680 x 4320) is refused before any frame is decoded
SEEK_AFTER_SECONDS = 1.0  # a target further ahead than this is reached by seeking, nearer ones by decoding on


class VideoLoadError(ImageLoadError):
    """A video that cannot be used; ``kind`` says why (see :data:`VIDEO_ERROR_KINDS`). An ``ImageLoadError``, so the
    dataset replaces a sample whose video breaks mid-run as it does for images."""

    def __init__(self, kind: str, path: str | Path, detail: str, *, video_folder: str | Path | None = None) -> None:
        self.kind = kind
        self.path = str(path)
        self.image_folder = self.video_folder = None if video_folder is None else str(video_folder)
        self.detail = detail
        where = f" (--video_folder {self.video_folder})" if self.video_folder is not None else ""
        Exception.__init__(self, f"{kind}: video {self.path!r}{where}: {detail}")


@dataclass(frozen=True)
class VideoSampling:
    """LLaVA-NeXT's ``--frames_upbound`` (0: no cap), ``--video_fps`` and ``--force_sample``."""

    frames_upbound: int = 0
    video_fps: float = 1.0
    force_sample: bool = False


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    height: int
    width: int
    frame_dir: bool = False

    @property
    def duration(self) -> float:
        return self.frames / self.fps


def sample_frame_indices(total: int, fps: float, sampling: VideoSampling) -> list[int]:
    """The frames LLaVA-NeXT samples from a video of ``total`` frames at ``fps``, in order (repeats when a forced
    count exceeds the frames)."""
    step = max(1, round(fps / sampling.video_fps))
    indices = list(range(0, total, step))
    if sampling.frames_upbound > 0 and (len(indices) > sampling.frames_upbound or sampling.force_sample):
        indices = np.linspace(0, total - 1, sampling.frames_upbound, dtype=int).tolist()
    return indices


def frame_times(info: VideoInfo, indices: list[int], sampling: VideoSampling) -> list[float]:
    """The times LLaVA-NeXT writes for the sampled frames: ``index / fps`` when ``--frames_upbound`` capped (or
    ``--force_sample`` forced) the sampling, ``index / step`` (the sampling step, ``round(fps / video_fps)``) when it
    did not -- seconds only at ``--video_fps 1`` --; a directory of frames ``index / 2`` (its shareVideoGPTV path)."""
    step = max(1, round(info.fps / sampling.video_fps))
    capped = sampling.frames_upbound > 0 and (len(range(0, info.frames, step)) > sampling.frames_upbound
                                              or sampling.force_sample)
    divisor = info.fps if info.frame_dir or capped else step
    return [i / divisor for i in indices]


def time_instruction(info: VideoInfo, indices: list[int], sampling: VideoSampling) -> str:
    """LLaVA-NeXT's ``--add_time_instruction`` sentence (its text, missing space included)."""
    frame_time = ",".join(f"{t:.2f}s" for t in frame_times(info, indices, sampling))
    return (f"The video lasts for {info.duration:.2f} seconds, and {len(indices)} frames are uniformly sampled from "
            f"it. These frames are located at {frame_time}.Please answer the following questions related to this "
            f"video.")


def resolve_video_path(video_folder: str | Path | None, rel: str) -> Path:
    """The real path of ``rel`` (a file or a directory of frames) inside ``video_folder``; nothing is opened."""
    if video_folder is None:
        raise VideoLoadError("missing", rel, "the record has a video but --video_folder is not set")
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise VideoLoadError("invalid_path", repr(rel), "the video path must be a non-empty string",
                             video_folder=video_folder)
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise VideoLoadError("absolute_path", rel, "absolute video paths are refused; give the path relative to "
                             "--video_folder", video_folder=video_folder)
    folder = Path(video_folder).resolve()
    if not folder.is_dir():
        raise VideoLoadError("missing", rel, "the video folder does not exist or is not a directory",
                             video_folder=video_folder)
    try:
        real = (folder / rel).resolve()
    except (OSError, RuntimeError) as err:
        raise VideoLoadError("unreadable", rel, f"cannot resolve the path: {err}", video_folder=video_folder) from err
    if not real.is_relative_to(folder):
        raise VideoLoadError("outside_folder", rel, f"the path resolves to {str(real)!r}, outside the video folder "
                             f"(through '..' or a symlink); refused", video_folder=video_folder)
    if not real.exists():
        raise VideoLoadError("missing", rel, "no such file or directory", video_folder=video_folder)
    return real


def _frame_files(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS),
                  key=lambda p: p.name)


def probe_video(video_folder: str | Path | None, rel: str) -> VideoInfo:
    """Frames, fps and frame size from the container's metadata (or the first frame file's header): no decoding."""
    real = resolve_video_path(video_folder, rel)
    if real.is_dir():
        files = _frame_files(real)
        if not files:
            raise VideoLoadError("empty", rel, f"the directory holds no frame images ({', '.join(FRAME_EXTENSIONS)})",
                                 video_folder=video_folder)
        try:
            with Image.open(files[0]) as image:
                width, height = image.size
        except (OSError, ValueError) as err:
            raise VideoLoadError("unreadable", rel, f"cannot read frame {files[0].name}: {err}",
                                 video_folder=video_folder) from err
        info = VideoInfo(len(files), FRAME_DIR_FPS, height, width, frame_dir=True)
    else:
        info = _probe_container(real, rel, video_folder)
    if info.height * info.width > MAX_FRAME_PIXELS:
        raise VideoLoadError("too_large", rel, f"frames of {info.width}x{info.height} pixels, more than "
                             f"{MAX_FRAME_PIXELS} per frame", video_folder=video_folder)
    return info


def _probe_container(real: Path, rel: str, video_folder) -> VideoInfo:
    import av  # PyAV and its FFmpeg libraries load with the first video file, not with the package

    try:
        with av.open(str(real)) as container:
            if not container.streams.video:
                raise VideoLoadError("empty", rel, "the file has no video stream", video_folder=video_folder)
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            duration = (float(stream.duration * stream.time_base) if stream.duration is not None
                        else container.duration / 1e6 if container.duration is not None else 0.0)
            frames = int(stream.frames) or int(round(duration * fps))
            width, height = stream.codec_context.width, stream.codec_context.height
    except VideoLoadError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise VideoLoadError("unreadable", rel, f"PyAV cannot open it ({err})", video_folder=video_folder) from err
    if frames <= 0:
        raise VideoLoadError("empty", rel, "the video stream has no frames", video_folder=video_folder)
    if duration <= 0 or fps <= 0:
        raise VideoLoadError("zero_length", rel, f"the video stream lasts {duration:g} s at {fps:g} fps",
                             video_folder=video_folder)
    return VideoInfo(frames, fps, height, width)


def _resized(image: Image.Image, size: int | None) -> Image.Image:
    image = image.convert("RGB") if image.mode != "RGB" else image
    return image.resize((size, size), resample=Image.Resampling.BICUBIC) if size and image.size != (size, size) else image


def decode_video_frames(video_folder: str | Path | None, rel: str, indices: list[int], *, size: int | None = None,
                        info: VideoInfo | None = None) -> list[Image.Image]:
    """The frames at ``indices`` (as :func:`sample_frame_indices` gives them), RGB, each resized to ``size`` x
    ``size`` right after decoding. A file is read by seeking: only the sampled frames are converted, never the whole
    video. An index just past the last decodable frame gets the last frame (the count always matches ``indices``);
    one more than a second past it is a ``truncated`` video."""
    info = info or probe_video(video_folder, rel)
    real = resolve_video_path(video_folder, rel)
    if info.frame_dir:
        files = _frame_files(real)
        out = []
        for i in indices:
            path = files[min(i, len(files) - 1)]
            try:
                with Image.open(path) as image:
                    image.load()
                    out.append(_resized(image, size))
            except (OSError, ValueError) as err:
                raise VideoLoadError("unreadable", rel, f"cannot decode frame {path.name}: {err}",
                                     video_folder=video_folder) from err
        return out
    return _decode_container(real, rel, video_folder, indices, info, size)


def _decode_container(real: Path, rel: str, video_folder, indices: list[int], info: VideoInfo,
                      size: int | None) -> list[Image.Image]:
    import av  # PyAV and its FFmpeg libraries load with the first video file, not with the package

    wanted = sorted(set(indices))
    got: dict[int, Image.Image] = {}
    opened = False
    try:
        with av.open(str(real)) as container:
            opened = True
            stream = container.streams.video[0]
            base = stream.time_base
            start = stream.start_time or 0
            decoder, last_index, last_frame = None, -1, None
            for target in wanted:
                if decoder is None or target < last_index or target - last_index > SEEK_AFTER_SECONDS * info.fps:
                    container.seek(start + int(target / info.fps / base), stream=stream, backward=True)
                    decoder = container.decode(stream)
                for frame in decoder:
                    last_frame = frame
                    last_index = round(float((frame.pts - start) * base) * info.fps) if frame.pts is not None else target
                    if last_index >= target:
                        break
                else:  # ran out: a frame or so short of the metadata's count is common, seconds short is a cut file
                    decoder = None
                    if last_frame is not None and target - last_index > max(1.0, info.fps * SEEK_AFTER_SECONDS):
                        raise VideoLoadError("truncated", rel, f"the stream ends at frame {last_index}, the container "
                                             f"lists {info.frames}", video_folder=video_folder)
                if last_frame is None:
                    raise VideoLoadError("empty", rel, "no frame could be decoded", video_folder=video_folder)
                # scaled by FFmpeg in the frame's own pixel format, then converted: no full-resolution RGB copy
                small = (last_frame.reformat(width=size, height=size, interpolation="BICUBIC") if size
                         else last_frame)
                image = small.to_image()
                got[target] = _resized(image, size)
    except VideoLoadError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        if opened:  # the container opened and listed its frames: the data breaks off (cut or damaged)
            raise VideoLoadError("truncated", rel, f"decoding failed after {len(got)} of {len(wanted)} sampled "
                                 f"frames ({err})", video_folder=video_folder) from err
        raise VideoLoadError("unreadable", rel, f"decoding failed ({err})", video_folder=video_folder) from err
    return [got[i] for i in indices]


@dataclass(frozen=True)
class VideoLayout:
    """How one video becomes tokens in the native model: each frame's ``grid_side`` x ``grid_side`` features pooled
    by ``pool_stride`` (``bilinear``: to ``ceil(side / stride)`` per side, LlavaOnevision; ``average`` / ``max``:
    ``floor(side / stride)``, LlavaNextVideo), then one ``image_newline`` after the whole video (``newline``,
    LlavaOnevision's ``one_token``) or none (LlavaNextVideo)."""

    frame_size: int  # the tower's input side: every frame is resized to frame_size x frame_size
    grid_side: int  # features per side of one frame: image_size // patch_size
    pool_mode: str = "bilinear"
    pool_stride: int = 2
    newline: bool = True
    sampling: VideoSampling = VideoSampling()
    add_time_instruction: bool = False

    @property
    def model_type(self) -> str:
        return "llava_onevision" if self.newline else "llava_next_video"

    @property
    def frame_tokens(self) -> int:
        side = (math.ceil(self.grid_side / self.pool_stride) if self.pool_mode == "bilinear"
                else self.grid_side // self.pool_stride)
        return side * side

    def video_tokens(self, frames: int) -> int:
        """Tokens of a video of ``frames`` sampled frames: frames x pooled features (+ one newline)."""
        return frames * self.frame_tokens + int(self.newline)


def video_messages(messages: list[Message], info: VideoInfo, indices: list[int], layout: VideoLayout) -> list[Message]:
    """With ``--add_time_instruction``, LLaVA-NeXT's rewrite of the first user turn: ``"<video>\\n" + sentence +
    "\\n" + the turn without its placeholder``; the messages unchanged otherwise."""
    if not layout.add_time_instruction:
        return messages
    first = next(i for i, m in enumerate(messages) if m.role == "user")
    out = [Message(m.role, m.content.replace(DEFAULT_VIDEO_TOKEN, "")) for m in messages]
    out[first] = Message("user", f"{DEFAULT_VIDEO_TOKEN}\n{time_instruction(info, indices, layout.sampling)}\n{out[first].content}")
    return out


def frames_to_pixel_values(frames: list[Image.Image], image_processor):
    """Square RGB frames -> ``[frames, 3, S, S]`` float32: rescaled and normalised with the tower processor's
    ``rescale_factor`` / ``image_mean`` / ``image_std``, as the saved video processor does (resize to the tower's
    square input, no crop)."""
    import torch  # only where pixels are made: `llava data check` reads this module without torch

    mean = np.asarray(image_processor.image_mean, np.float32)[:, None, None]
    std = np.asarray(image_processor.image_std, np.float32)[:, None, None]
    scale = np.float32(getattr(image_processor, "rescale_factor", 1 / 255))
    arrays = [(np.asarray(f, np.float32).transpose(2, 0, 1) * scale - mean) / std for f in frames]
    return torch.from_numpy(np.stack(arrays))


def load_record_video(video_folder: str | Path | None, rel: str, layout: VideoLayout, image_processor,
                      record_id: str) -> tuple[VideoInfo, list[int], torch.Tensor]:
    """A record's video as training feeds it (the SFT and the preference datasets): ``(info, sampled frame indices,
    pixel_values_videos [1, frames, 3, S, S])``, the frames sampled by ``layout.sampling``, decoded and resized to the
    tower's input; a failure is a :class:`VideoLoadError` naming the record."""
    try:
        info = probe_video(video_folder, rel)
        indices = sample_frame_indices(info.frames, info.fps, layout.sampling)
        frames = decode_video_frames(video_folder, rel, indices, size=layout.frame_size, info=info)
    except VideoLoadError as err:
        raise VideoLoadError(err.kind, err.path, f"{err.detail} (record {record_id!r})",
                             video_folder=video_folder) from err
    return info, indices, frames_to_pixel_values(frames, image_processor)[None]
