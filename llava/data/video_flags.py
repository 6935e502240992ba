"""LLaVA-NeXT's video flags -> the native recipe they select, checked at start-up.

    check_video_flags(model_args, data_args, training_args)        # one-line UsageValueError naming the flag
    layout = video_layout_from_flags(model_args, data_args, vision_config)   # VideoLayout, or None without video

Video is on when ``--video_folder`` is given, or when an entry of a dataset-mixture YAML (``--data_path`` /
``--eval_data_path``) gives its own ``video_folder``: the model class follows the data. ``--mm_newline_position``
picks the native class:

============  ==========================  =============================================  ==========================
newline       --mm_spatial_pool_mode      native class                                   images
============  ==========================  =============================================  ==========================
one_token     bilinear                    LlavaOnevisionForConditionalGeneration         --image_aspect_ratio
                                          (frames pooled to ceil(side/2), one newline)   anyres_max_N
no_token      average or max              LlavaNextVideoForConditionalGeneration         --image_aspect_ratio anyres
                                          (frames pooled to side/2, no newline)
============  ==========================  =============================================  ==========================

``grid`` (a newline after every feature row of every frame, LLaVA-Video's scripts) and ``frame`` (one after each
frame) are computed by no native class and refused, naming one_token as the nearest. The stride is 2 in both classes
(LlavaOnevision hard-codes it; LlavaNextVideo's processor counts ``side^2 // 4`` per frame, which also needs an even
feature grid). LlavaNextVideo pools the tower's features before the projector, LLaVA-NeXT after it: a run trains what
the native class computes.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from llava.data.anyres import parse_image_aspect_ratio
from llava.data.video import VideoLayout, VideoSampling
from llava.errors import UsageValueError

NATIVE_VIDEO = {"one_token": ("bilinear",), "no_token": ("average", "max")}


def video_enabled(data_args) -> bool:
    """``--video_folder``, or a mixture entry's own ``video_folder`` (the class that trains and saves follows the data)."""
    if getattr(data_args, "video_folder", None):
        return True
    return any(mixture_gives_video_folder(getattr(data_args, flag, None)) for flag in ("data_path", "eval_data_path"))


def mixture_gives_video_folder(path) -> bool:
    """Whether a mixture YAML has an entry with its own ``video_folder``. Read leniently: a YAML that cannot be read
    is no video here, and ``read_mixture`` names its fault when the sources open. Read once per version of the file
    (keyed by its absolute path, mtime and size): start-up asks at several places."""
    from llava.data.sources import is_mixture_path  # imported when asked, not when this module loads (as yaml)

    if not is_mixture_path(path):
        return False
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return _yaml_gives_video_folder(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _yaml_gives_video_folder(path: str, mtime_ns: int, size: int) -> bool:
    import yaml  # only when a mixture YAML is read

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    entries = data.get("datasets") if isinstance(data, dict) else None
    return isinstance(entries, list) and any(isinstance(e, dict) and e.get("video_folder") for e in entries)


def check_video_flags(model_args, data_args, training_args=None) -> None:
    """The flag combinations a video run may use (nothing is checked without video: :func:`video_enabled`)."""
    if not video_enabled(data_args):
        return
    newline, mode = model_args.mm_newline_position, model_args.mm_spatial_pool_mode
    if newline not in NATIVE_VIDEO:
        raise UsageValueError(
            f"--mm_newline_position {newline}: a newline {'after every feature row of every frame' if newline == 'grid' else 'after every frame'} "
            f"is computed by no native class, so the run could not be saved as one; use one_token (one newline per "
            f"video, bilinear pooling: LlavaOnevision) or no_token (LlavaNextVideo)")
    if mode not in NATIVE_VIDEO[newline]:
        nearest = NATIVE_VIDEO[newline][0]
        raise UsageValueError(f"--mm_spatial_pool_mode {mode} with --mm_newline_position {newline}: the native "
                              f"{'LlavaOnevision' if newline == 'one_token' else 'LlavaNextVideo'} pools video frames "
                              f"with {' or '.join(NATIVE_VIDEO[newline])}; use {nearest}")
    stride = model_args.mm_spatial_pool_stride
    if stride not in (None, 2):
        raise UsageValueError(f"--mm_spatial_pool_stride {stride}: the native video classes pool by 2 (LlavaOnevision "
                              f"hard-codes it, LlavaNextVideo's processor counts side^2 // 4 tokens per frame); use 2")
    if model_args.mm_vision_select_feature != "patch":
        raise UsageValueError(f"--mm_vision_select_feature {model_args.mm_vision_select_feature} with --video_folder: "
                              f"the native video pooling reshapes patch features only; use patch")
    ratio, max_n = parse_image_aspect_ratio(data_args.image_aspect_ratio)
    want = "anyres_max_N" if newline == "one_token" else "anyres"
    if ratio != "anyres" or (newline == "one_token") != bool(max_n):
        raise UsageValueError(
            f"--image_aspect_ratio {data_args.image_aspect_ratio} with --mm_newline_position {newline}: the native "
            f"{'LlavaOnevision' if newline == 'one_token' else 'LlavaNextVideo'} processes a run's images as {want}; "
            f"use --image_aspect_ratio {'anyres_max_9' if newline == 'one_token' else 'anyres'} "
            f"(and --mm_patch_merge_type spatial_unpad)")
    batch = max(getattr(training_args, "per_device_train_batch_size", 1),
                getattr(training_args, "per_device_eval_batch_size", 1) if getattr(data_args, "eval_data_path", None)
                else 1)
    if newline == "one_token" and batch > 1 and not data_args.force_sample:
        raise UsageValueError(
            f"--per_device_train_batch_size {batch} with --mm_newline_position one_token needs --force_sample True: "
            f"LlavaOnevision takes one frame count per batch of videos, and only --force_sample gives every video "
            f"--frames_upbound frames (or use batch size 1)")


def video_layout_from_flags(model_args, data_args, vision_config) -> VideoLayout | None:
    """The run's :class:`VideoLayout` on this tower (None without video: :func:`video_enabled`)."""
    if not video_enabled(data_args):
        return None
    check_video_flags(model_args, data_args)
    side = vision_config.image_size // vision_config.patch_size
    newline = model_args.mm_newline_position == "one_token"
    if not newline and side % 2:
        raise UsageValueError(f"--mm_newline_position no_token (LlavaNextVideo) on a tower with a {side}x{side} feature "
                              f"grid: its processor counts side^2 // 4 tokens per frame, which equals the pooled "
                              f"features only for an even side; use one_token (LlavaOnevision) or another tower")
    return VideoLayout(
        frame_size=vision_config.image_size, grid_side=side, pool_mode=model_args.mm_spatial_pool_mode,
        pool_stride=model_args.mm_spatial_pool_stride or 2, newline=newline,
        sampling=VideoSampling(data_args.frames_upbound, float(data_args.video_fps), bool(data_args.force_sample)),
        add_time_instruction=bool(data_args.add_time_instruction))
