"""The native video classes, composed by the builder when ``--video_folder`` turns video on (llava/data/video_flags.py).

    video = video_layout_from_flags(model_args, data_args, tower_config)   # llava/data/video_flags.py
    config = make_next_video_config(common, layout, video)  # LlavaNextVideoConfig (OneVision: make_anyres_config)
    processor = make_next_video_processor(layout, tower_processor, tokenizer, vision_config, strategy)

- ``one_token`` + ``bilinear``: ``LlavaOnevisionForConditionalGeneration``. Its ``get_video_features`` runs every frame
  through the tower, projects, pools each frame's grid bilinearly to ``ceil(side / 2)`` per side and appends one
  ``image_newline`` per video; its processor counts ``frames * ceil(sqrt(num_image_tokens) / 2) ** 2 + 1``.
- ``no_token`` + ``average`` / ``max``: ``LlavaNextVideoForConditionalGeneration``. Its ``vision_resampler`` pools the
  tower's features by 2 (before the projector), no newline; its processor counts ``(S / patch) ** 2 // 4`` per frame.

Both take ``pixel_values_videos`` ``[videos, frames, 3, S, S]`` beside the images' ``pixel_values`` and scatter the
features into ``<video>`` tokens (``config.video_token_id``). The processors' video halves need torchvision, which
cannot run here: their files are written as ``save_pretrained`` writes them (``VideoProcessorFiles``), and
``AutoProcessor`` reads them where torchvision is installed.
"""

from __future__ import annotations

import json

from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

from llava.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN, HAS_CLS_TOKEN
from llava.data.anyres import AnyresLayout, build_anyres_image_processor
from llava.data.video import VideoLayout, VideoSampling
from llava.data.video_flags import check_video_flags, video_enabled
from llava.errors import UsageValueError
from llava.model.processor_files import ProcessorFiles

VIDEO_MODEL_CLASSES = {"llava_next_video": LlavaNextVideoForConditionalGeneration}


def make_next_video_config(common: dict, layout: AnyresLayout, video: VideoLayout):
    """The LlavaNextVideo config for images under ``layout`` and videos under ``video``; ``common`` (from
    ``builder.make_llava_config``) carries ``video_token_index``. (OneVision's is ``make_anyres_config``'s.)"""
    return LlavaNextVideoConfig(**common, image_grid_pinpoints=[list(p) for p in layout.grid_pinpoints],
                                image_seq_length=layout.base_tokens, spatial_pool_mode=video.pool_mode,
                                spatial_pool_stride=video.pool_stride,
                                video_seq_length=video.frame_tokens)


def video_layout_from_config(config, sampling: VideoSampling, add_time_instruction: bool = False) -> VideoLayout:
    """The :class:`VideoLayout` a saved LlavaOnevision / LlavaNextVideo config computes (frames sampled by
    ``sampling``, which is the run's, not the model's)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if config.model_type == "llava_onevision":
        return VideoLayout(vision.image_size, side, "bilinear", 2, True, sampling, add_time_instruction)
    if config.model_type == "llava_next_video":
        return VideoLayout(vision.image_size, side, config.spatial_pool_mode, config.spatial_pool_stride, False,
                           sampling, add_time_instruction)
    raise ValueError(f"model_type {config.model_type!r} has no video path (LlavaOnevision or LlavaNextVideo)")


def next_video_processor_dict(image_processor: dict) -> dict:
    """The ``video_processor`` entry of a LlavaNextVideo ``processor_config.json`` (transformers' own class writes
    it): frames resized to the tower's square input, no crop, the image processor's normalisation, as training
    feeds them to the model."""
    # transformers' video processor module, only when a LlavaNextVideo processor is saved
    from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor

    size = image_processor["size"]
    side = size.get("height") or size.get("shortest_edge")
    video = LlavaNextVideoVideoProcessor(
        size={"height": side, "width": side}, do_center_crop=False, image_mean=image_processor["image_mean"],
        image_std=image_processor["image_std"], resample=image_processor["resample"],
        rescale_factor=image_processor["rescale_factor"]).to_dict()
    return json.loads(json.dumps(video, default=int))  # resample is an enum


class VideoProcessorFiles(ProcessorFiles):
    """Stands in for ``LlavaNextVideoProcessor`` (which transformers builds only with torchvision; see
    ``ProcessorFiles``): its image half is LlavaNext's, its video half the frames."""

    processor_class = "LlavaNextVideoProcessor"
    image_processor_type = "LlavaNextImageProcessor"

    def video_processor_dict(self, image_processor: dict) -> dict:
        return next_video_processor_dict(image_processor)


def make_next_video_processor(layout: AnyresLayout, tower_processor, tokenizer, vision_config, strategy: str):
    """The LlavaNextVideo processor's files: its image half is LlavaNext's (anyres), its video half the frames."""
    image_processor = build_anyres_image_processor(layout, tower_processor)
    settings = dict(patch_size=vision_config.patch_size, vision_feature_select_strategy=strategy,
                    image_token=DEFAULT_IMAGE_TOKEN, video_token=DEFAULT_VIDEO_TOKEN,
                    num_additional_image_tokens=int(vision_config.model_type in HAS_CLS_TOKEN))
    return VideoProcessorFiles(image_processor, tokenizer, getattr(tokenizer, "chat_template", None), settings)


def load_next_video_processor_files(path, config: dict, tokenizer, chat_template):
    """``VideoProcessorFiles`` read back from a LlavaNextVideo checkpoint's ``processor_config.json``."""
    # the PIL image processor, only when a checkpoint's processor is read without torchvision
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image = {k: v for k, v in config["image_processor"].items() if k != "image_processor_type"}
    settings = {k: config[k] for k in ("patch_size", "vision_feature_select_strategy", "image_token", "video_token",
                                       "num_additional_image_tokens") if k in config}
    return VideoProcessorFiles(LlavaNextImageProcessorPil(**image), tokenizer, chat_template, settings)


def checkpoint_video_layout(path: str, config, model_args, data_args) -> VideoLayout | None:
    """A video run from a saved checkpoint: its class must be the one the video flags select."""
    if not video_enabled(data_args):
        return None
    check_video_flags(model_args, data_args)
    want = "llava_onevision" if model_args.mm_newline_position == "one_token" else "llava_next_video"
    if config.model_type != want:
        raise UsageValueError(f"--model_name_or_path {path} is a {config.model_type} checkpoint, but --mm_newline_position "
                              f"{model_args.mm_newline_position} trains video as {want}; start from a {want} checkpoint "
                              f"or from an LLM + --vision_tower")
    sampling = VideoSampling(data_args.frames_upbound, float(data_args.video_fps), bool(data_args.force_sample))
    return video_layout_from_config(config, sampling, bool(data_args.add_time_instruction))
